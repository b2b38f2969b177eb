# 8-GPU runs inside NVIDIA's PyTorch container, which already ships torch, apex and dllogger-friendly
# tooling. Build: docker build -t sparsebert .   Run: see README ("GPU path").
ARG FROM_IMAGE_NAME=nvcr.io/nvidia/pytorch:24.10-py3
FROM ${FROM_IMAGE_NAME}

ENV BERT_PREP_WORKING_DIR=/workspace/bert/data \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /workspace/bert

# The container's torch satisfies every torch requirement; nothing here pulls another torch.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt nltk boto3 \
 && pip install --no-cache-dir git+https://github.com/NVIDIA/dllogger \
 && python -m nltk.downloader punkt

COPY . .

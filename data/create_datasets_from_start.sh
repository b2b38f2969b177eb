#!/usr/bin/env bash
# Build the pretraining shards from scratch, as NVIDIA's script does.
#   bash data/create_datasets_from_start.sh [wiki_only|wiki_books|demo]
# wiki_only (default): English Wikipedia. wiki_books: Wikipedia + your BooksCorpus copy in
# $BERT_PREP_WORKING_DIR/download/bookscorpus (it can no longer be downloaded). demo: text that
# ships with Python, no download. Every step skips finished outputs: rerun to resume.
set -euo pipefail
to_download=${1:-wiki_only}
export BERT_PREP_WORKING_DIR=${BERT_PREP_WORKING_DIR:-$PWD/data_prep}
here=$(cd "$(dirname "$0")" && pwd)
prep() { python "$here/bertPrep.py" "$@"; }
n_processes=${N_PROCESSES:-$(nproc)}

case "$to_download" in
  wiki_only)  dataset=wikicorpus_en; shards=(--n_training_shards 256 --n_test_shards 256) ;;
  wiki_books) dataset=books_wiki_en_corpus; shards=(--n_training_shards 256 --n_test_shards 256) ;;
  demo)       dataset=demo; shards=(--n_training_shards 4 --n_test_shards 1) ;;
  *) echo "usage: $0 [wiki_only|wiki_books|demo]" >&2; exit 2 ;;
esac

if [ "$dataset" != demo ]; then
  prep --action download --dataset wikicorpus_en
  [ "$dataset" = books_wiki_en_corpus ] && prep --action download --dataset bookscorpus
  prep --action download --dataset google_pretrained_weights
  prep --action download --dataset squad
  prep --action download --dataset glue
fi

prep --action text_formatting --dataset "$dataset" --n_processes "$n_processes"
prep --action sharding --dataset "$dataset" "${shards[@]}" --n_processes "$n_processes"

# Phase 1 (128 tokens, 20 predictions) and phase 2 (512 tokens, 80 predictions).
prep --action create_hdf5_files --dataset "$dataset" "${shards[@]}" --n_processes "$n_processes" \
  --max_seq_length 128 --max_predictions_per_seq 20 --masked_lm_prob 0.15 --random_seed 12345 \
  --dupe_factor 5 --do_lower_case 1
prep --action create_hdf5_files --dataset "$dataset" "${shards[@]}" --n_processes "$n_processes" \
  --max_seq_length 512 --max_predictions_per_seq 80 --masked_lm_prob 0.15 --random_seed 12345 \
  --dupe_factor 5 --do_lower_case 1

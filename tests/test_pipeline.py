"""scripts/pipeline.py: the data, configs and command lines demo.py and reproduce.py share."""
import ast
import json
from pathlib import Path

import pytest

import run_glue
import run_pretraining
from checkpoints import checkpoint_path

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pipeline(script_module):
    return script_module("pipeline")


@pytest.fixture
def workspace(pipeline, tmp_path, minilm):
    return pipeline.Pipeline(tmp_path, pipeline.PretrainingSizes(seq_len=64, max_pred=10, batch=16, learning_rate=1e-3),
                             pipeline.GlueSizes(seq_len=32, batch=8, steps=40, learning_rate=1e-4))


def test_a_pretraining_command_parses_and_checkpoints_once_at_its_last_step(workspace, tmp_path):
    folder = tmp_path / "search"
    argv = workspace.pretraining_command(folder, config=tmp_path / "c.json", init=workspace.pretrained, steps=25,
                                         seed=7, target_sparsity=0.8, progress_bar=False)
    assert argv[0] == "run_pretraining.py"
    args = run_pretraining.parse_arguments(argv[1:])
    assert (args.max_steps, args.num_steps_per_checkpoint, args.log_freq, args.seed) == (25, 25, 2, 7)
    assert (args.max_seq_length, args.max_predictions_per_seq, args.train_batch_size) == (64, 10, 16)
    assert args.input_dir == str(tmp_path / "data" / "shards") and args.vocab_file == str(workspace.vocab_file)
    assert args.target_sparsity == 0.8 and args.lamb is None and args.mask_learning_rate is None
    assert args.disable_progress_bar and args.json_summary == str(folder / "dllogger.json")
    assert checkpoint_path(folder, args.num_steps_per_checkpoint) == folder / "ckpt_25.pt"  # where scripts read it

    lam = workspace.pretraining_command(folder, config=tmp_path / "c.json", init=workspace.pretrained, steps=4,
                                        seed=42, lamb=1e-4, mask_learning_rate=0.05)
    args = run_pretraining.parse_arguments(lam[1:])
    assert (args.lamb, args.mask_learning_rate, args.target_sparsity, args.log_freq) == (1e-4, 0.05, None, 1)
    assert not args.disable_progress_bar


def test_a_glue_command_parses_with_its_mask_and_the_corpus_task(pipeline, workspace, tmp_path):
    mask = pipeline.Mask("file", tmp_path / "m.safetensors")
    argv = workspace.glue_command(tmp_path / "glue", task="cola", task_folder="CoLA", init=tmp_path / "ckpt_4.pt",
                                  config=tmp_path / "c.json", mask=mask, seed=3, keep_checkpoint=False)
    assert argv[0] == "run_glue.py"
    args = run_glue.parse_arguments(argv[1:])
    assert args.data_dir == str(workspace.corpus / "glue" / "CoLA") and args.task_name == "cola"
    assert (args.max_seq_length, args.train_batch_size, args.max_steps, args.learning_rate) == (32, 8, 40, 1e-4)
    assert args.attention_mask_type == "file" and args.attention_mask_file == str(tmp_path / "m.safetensors")
    assert args.skip_checkpoint and not args.do_predict and args.seed == 3
    dense = workspace.glue_command(tmp_path, task="sst-2", task_folder="SST-2", init=tmp_path, config=tmp_path,
                                   mask=pipeline.Mask("dense"), seed=2, predict=True)
    args = run_glue.parse_arguments(dense[1:])
    assert args.do_predict and not args.skip_checkpoint and args.attention_mask_file is None


def test_a_mask_is_the_same_as_flags_and_as_config_fields(pipeline, tmp_path):
    assert pipeline.Mask("star").flags() == ["--attention_mask_type", "star"]
    assert pipeline.Mask("star").config_fields() == {"attention_mask_type": "star"}
    mask = pipeline.Mask("file", tmp_path / "m.safetensors")
    assert mask.config_fields() == {"attention_mask_type": "file", "attention_mask_file": str(tmp_path / "m.safetensors")}


def test_a_config_is_the_pretrained_architecture_with_the_mask_fields(workspace, tmp_path, minilm):
    path = workspace.write_config(tmp_path / "run", attention_mask_type="dam_s", dam_share_across_layers=True)
    config = json.loads(path.read_text())
    hf = json.loads((minilm / "config.json").read_text())
    assert path == tmp_path / "run" / "bert_config.json"
    assert config["num_hidden_layers"] == hf["num_hidden_layers"] and config["hidden_size"] == hf["hidden_size"]
    assert config["mask_seq_length"] == 64 and config["attention_mask_type"] == "dam_s"
    assert config["dam_share_across_layers"] is True


def literals_outside_parsers(path: Path) -> set[str]:
    """String constants of `path`, leaving out those of its own add_argument calls (its own flags)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parser_args = {id(node) for call in ast.walk(tree) if isinstance(call, ast.Call)
                   and getattr(call.func, "attr", None) == "add_argument" for node in ast.walk(call)}
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in parser_args}


def test_only_the_pipeline_spells_the_training_scripts_and_their_flags():
    spelled = {s for s in literals_outside_parsers(ROOT / "scripts" / "pipeline.py")
               if s.startswith("--") or s.endswith(".py")}
    assert {"run_pretraining.py", "run_glue.py", "--max_seq_length", "--attention_mask_type"} <= spelled
    for script in ("demo.py", "reproduce.py"):
        repeated = spelled & literals_outside_parsers(ROOT / "scripts" / script)
        assert not repeated, f"scripts/{script} spells {sorted(repeated)}: build the command in scripts/pipeline.py"

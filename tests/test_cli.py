"""The command line: good runs produce files; bad input gets one line and exit code 2."""

import json
import subprocess
import sys

import pytest

from selfpruner import export
from selfpruner.cli import main


def run_cli(*args, env=None):
    """A real process, so we see exactly what a user sees (stderr, exit code)."""
    return subprocess.run([sys.executable, "-m", "selfpruner.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def assert_one_line_error(done, fragment):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("selfpruner: error: ") and fragment in lines[0], lines[0]


def test_eval_prints_json(tiny_model_dir, capsys):
    folder, text = tiny_model_dir
    assert main(["eval", "--model", str(folder), "--text", str(text), "--seq-len", "128", "--tokens", "1024",
                 "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"perplexity", "tokens"}
    assert result["tokens"] == 8 * 127 and result["perplexity"] > 1


def test_eval_scores_texts_of_several_domains_and_their_geometric_mean(tiny_model_dir, tmp_path, capsys):
    folder, text = tiny_model_dir
    other = tmp_path / "other.txt"
    other.write_text(text.read_text()[::-1])
    common = ["eval", "--model", str(folder), "--seq-len", "128", "--tokens", "512", "--json", "--device", "cpu"]
    singles = []
    for t in (text, other):
        assert main(common + ["--text", str(t)]) == 0
        singles.append(json.loads(capsys.readouterr().out))
    assert main(common + ["--text", str(text), "--text", str(other), "--output", str(tmp_path / "ppl.json")]) == 0
    both = json.loads(capsys.readouterr().out)
    assert [{k: v for k, v in r.items() if k != "text"} for r in both["texts"]] == singles
    assert [r["text"] for r in both["texts"]] == [str(text), str(other)]
    assert both["geometric_mean"] == pytest.approx((singles[0]["perplexity"] * singles[1]["perplexity"]) ** 0.5)
    assert json.loads((tmp_path / "ppl.json").read_text())["texts"] == both["texts"]
    assert_one_line_error(run_cli("eval", "--model", folder, "--text", text, "--text", text), "same text twice")


def test_prune_with_a_rates_file(tiny_model_dir, tmp_path, capsys):
    folder, text = tiny_model_dir
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"attention": [0.5, 0.0], "mlp": [0.2, 0.6]}))
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(folder), "--rates", str(rates), "--output", str(out), "--metric", "flap",
                 "--calibration-text", str(text), "--calibration-windows", "4", "--calibration-seq-len", "128",
                 "--eval", "--eval-text", str(text), "--eval-seq-len", "128", "--eval-tokens", "512",
                 "--json", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)
    meta = json.loads((out / "pruning.json").read_text())
    assert meta["rates"] == {"attention": [0.5, 0.0], "mlp": [0.2, 0.6]}
    assert meta["metric"] == "flap" and meta["bias_compensation"] is True
    assert meta["perplexity"]["pruned"] == summary["pruned"]
    assert summary["pruned"]["perplexity"] != summary["dense"]["perplexity"]  # random weights: either way
    # the checkpoint evaluates to the same perplexity the prune command reported
    assert main(["eval", "--model", str(out), "--text", str(text), "--seq-len", "128", "--tokens", "512",
                 "--json", "--device", "cpu"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["perplexity"] == pytest.approx(summary["pruned"]["perplexity"], rel=1e-5)


def test_prune_with_the_refit_writes_a_checkpoint_that_evaluates_as_reported(tiny_model_dir, tmp_path, capsys):
    folder, text = tiny_model_dir
    common = ["--model", str(folder), "--ratio", "0.4", "--calibration-text", str(text), "--calibration-windows", "4",
              "--calibration-seq-len", "128", "--eval", "--eval-text", str(text), "--eval-seq-len", "128",
              "--eval-tokens", "512", "--json", "--device", "cpu"]
    summaries = {}
    for refit in (False, True):
        out = tmp_path / f"pruned-{refit}"
        assert main(["prune", *common, "--output", str(out), "--refit" if refit else "--no-refit"]) == 0
        summaries[refit] = json.loads(capsys.readouterr().out)
        assert json.loads((out / "pruning.json").read_text())["refit"] is refit
    assert summaries[True]["pruned"]["perplexity"] != summaries[False]["pruned"]["perplexity"]
    assert main(["eval", "--model", str(tmp_path / "pruned-True"), "--text", str(text), "--seq-len", "128",
                 "--tokens", "512", "--json", "--device", "cpu"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["perplexity"] == pytest.approx(summaries[True]["pruned"]["perplexity"], rel=1e-5)


def test_missing_model(tmp_path):
    assert_one_line_error(run_cli("eval", "--model", tmp_path / "nope"), "not found")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=1)).save_pretrained(tmp_path / "gpt2")
    from conftest import char_tokenizer

    char_tokenizer().save_pretrained(tmp_path / "gpt2")
    done = run_cli("prune", "--model", tmp_path / "gpt2", "--ratio", "0.3", "--output", tmp_path / "out")
    assert_one_line_error(done, "unsupported architecture 'gpt2'")
    assert "llama, mistral, qwen2" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "rates, fragment",
    [
        ([0.1, 0.2, 0.3], "has 3 rates but the model has 2 blocks"),
        ([0.1, 1.5], "a rate must be in [0, 1)"),
        ("not json", "is not readable JSON"),
    ],
)
def test_bad_rates(tiny_model_dir, tmp_path, rates, fragment):
    folder, text = tiny_model_dir
    path = tmp_path / "rates.json"
    path.write_text(rates if isinstance(rates, str) else json.dumps(rates))
    out = tmp_path / "out"
    done = run_cli("prune", "--model", folder, "--rates", path, "--output", out, "--calibration-text", text,
                   "--device", "cpu")
    assert_one_line_error(done, fragment)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


def test_ratio_out_of_range(tiny_model_dir, tmp_path):
    folder, _ = tiny_model_dir
    assert_one_line_error(run_cli("prune", "--model", folder, "--ratio", "1.2", "--output", tmp_path / "o"),
                          "a rate must be in [0, 1)")


def test_unreadable_text_file(tiny_model_dir, tmp_path):
    folder, _ = tiny_model_dir
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 \xff\xfe")
    assert_one_line_error(run_cli("eval", "--model", folder, "--text", bad, "--device", "cpu"), "not readable UTF-8")
    assert_one_line_error(run_cli("eval", "--model", folder, "--text", tmp_path / "missing.txt", "--device", "cpu"),
                          "does not exist")


def test_non_empty_output_is_not_overwritten(tiny_model_dir, tmp_path):
    folder, text = tiny_model_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    done = run_cli("prune", "--model", folder, "--ratio", "0.3", "--output", out, "--calibration-text", text)
    assert_one_line_error(done, "is not empty")
    assert (out / "precious.txt").read_text() == "keep me"


def test_a_failed_export_leaves_nothing_behind(tiny_model_dir, tmp_path, monkeypatch):
    folder, text = tiny_model_dir

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_save_weights", disk_full)
    with pytest.raises(OSError):
        main(["prune", "--model", str(folder), "--ratio", "0.3", "--output", str(tmp_path / "out"),
              "--calibration-text", str(text), "--calibration-windows", "2", "--calibration-seq-len", "64",
              "--device", "cpu"])
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_prune_defaults_are_a_prunejobs(tiny_job):
    """`selfpruner prune` and `selfpruner run` build the same checkpoint from the same rates: the
    flags' defaults are the CRD's (bias compensation was off for wanda-sp in one, on in the other)."""
    from selfpruner import spec as spec_mod
    from selfpruner.cli import build_parser

    args = build_parser().parse_args(["prune", "--model", "m", "--ratio", "0.3", "--output", "o"])
    spec = spec_mod.parse({"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob", "metadata": {"name": "d"},
                           "spec": {"model": {"source": "demo"}, "target": {"ratio": 0.3}}}).spec
    p, c = spec["pruning"], spec["calibration"]
    assert (args.metric, args.bias_compensation, args.head_mode, args.mlp_multiple) == \
        (p["metric"], p["biasCompensation"], p["headMode"], p["mlpMultiple"])
    assert (args.calibration_text, args.calibration_windows, args.calibration_seq_len) == \
        (c["text"], c["windows"], c["seqLen"])

"""cli.py (snapkv-run): output, --json/--stats, and one-line errors with exit code 2 for bad input."""

import json
import subprocess

import pytest

import cli
import options
from tests.conftest import ROOT


def run_main(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def prompt_file(tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("What is the capital of France?")
    return f


def test_json_output_matches_library(capsys, tiny_chat_dir, prompt_file):
    """--json prints what the library generates for the same chat prompt (any model will do: a tiny random one
    with SmolLM2's vocabulary; test_streamed_text_and_stats runs SmolLM2)."""
    code, out, err = run_main(capsys, "--model", str(tiny_chat_dir), "--prompt", str(prompt_file), "--json",
                              "--max-new-tokens", "12", "--no-snapkv")
    assert code == 0
    result = json.loads(out)
    from engine import LLM, SamplingParams

    expected = LLM(tiny_chat_dir, max_batch_size=1).generate("What is the capital of France?",
                                                             SamplingParams(max_tokens=12), chat=True)[0]
    assert result["text"] == expected.text and result["token_ids"] == expected.token_ids
    assert result["stats"]["prompt_tokens"] == expected.stats["prompt_tokens"]


def test_streamed_text_and_stats(capsys, smol_dir, prompt_file):
    code, out, err = run_main(capsys, "--model", str(smol_dir), "--prompt", str(prompt_file), "--stats",
                              "--max-new-tokens", "12")
    assert code == 0
    assert "Paris" in out
    assert "prompt tokens" in err and "kept tokens" in err and "KV cache" in err and "decode" in err


def test_console_script_reads_stdin():
    exe = ROOT / ".venv" / "bin" / "snapkv-run"
    proc = subprocess.run([str(exe), "--prompt", "-", "--max-new-tokens", "8", "--no-chat", "--json"],
                          input="The capital of France is".encode(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["stats"]["prompt_tokens"] == 5


def assert_one_line_error(code, err, pattern):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    import re
    assert re.search(pattern, lines[0]), lines[0]


def test_bad_inputs_exit_2_with_one_line(capsys, smol_dir, prompt_file, tmp_path):
    model = ["--model", str(smol_dir)]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    huge = tmp_path / "huge.txt"
    huge.write_text("word " * 9000)
    not_model = tmp_path / "not_a_model"
    not_model.mkdir()
    cases = [
        (["--model", str(tmp_path / "missing"), "--prompt", str(prompt_file)], "model not found"),
        (["--model", str(not_model), "--prompt", str(prompt_file)], "not a model directory"),
        ([*model, "--prompt", str(tmp_path / "nope.txt")], "cannot read prompt file"),
        ([*model, "--prompt", str(empty)], "is empty"),
        ([*model, "--prompt", str(latin1)], "not UTF-8"),
        ([*model, "--prompt", str(huge)], "at most 8192 positions"),
        ([*model, "--prompt", str(prompt_file), "--temperature", "-1"], "temperature"),
        ([*model, "--prompt", str(prompt_file), "--top-p", "2"], "top_p"),
        ([*model, "--prompt", str(prompt_file), "--max-new-tokens", "0"], "max_tokens"),
        ([*model, "--prompt", str(prompt_file), "--max-new-tokens", "ten"], "Invalid value for .--max-new-tokens."),
        ([*model, "--prompt", str(prompt_file), "--device", "tpu"], "tpu"),
        ([*model], "Missing option '--prompt'"),
    ]
    for args, pattern in cases:
        code, _, err = run_main(capsys, *args)
        assert_one_line_error(code, err, pattern)


def test_default_model_hint(capsys, prompt_file, monkeypatch, tmp_path):
    monkeypatch.setattr(options, "DEFAULT_MODEL", tmp_path / "weights" / "SmolLM2-135M-Instruct")
    code, _, err = run_main(capsys, "--prompt", str(prompt_file))
    assert_one_line_error(code, err, "run `make weights`")


def test_snapkv_flags_and_show_kept(capsys, smol_dir, tmp_path):
    from html.parser import HTMLParser

    prompt = tmp_path / "long.txt"
    prompt.write_text((ROOT / "examples" / "long_prompt.txt").read_text()[:3000])
    page = tmp_path / "view" / "kept.html"
    code, out, err = run_main(capsys, "--model", str(smol_dir), "--prompt", str(prompt), "--budget", "200",
                              "--window", "16", "--kernel", "5", "--pooling", "avg", "--max-new-tokens", "4",
                              "--show-kept", str(page), "--stats")
    assert code == 0, err
    assert "kept tokens     200 per layer and kv head" in err
    png = page.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[0] > 100

    class Page(HTMLParser):
        """Checks the nesting and collects the text of each element with an id (the kept data's <script>)."""

        def __init__(self):
            super().__init__()
            self.open_tags, self.by_id, self.scripts = [], {}, []

        def handle_starttag(self, tag, attrs):
            if tag not in ("meta",):
                self.open_tags.append((tag, dict(attrs).get("id")))

        def handle_endtag(self, tag):
            assert self.open_tags.pop()[0] == tag  # well nested

        def handle_data(self, data):
            if self.open_tags and self.open_tags[-1][1]:
                self.by_id[self.open_tags[-1][1]] = self.by_id.get(self.open_tags[-1][1], "") + data
            if self.open_tags and self.open_tags[-1] == ("script", None):
                self.scripts.append(data)

    parser = Page()
    text = page.read_text()
    parser.feed(text)
    assert text.startswith("<!DOCTYPE html>") and parser.open_tags == []
    # the page is drawn by the server page's own renderer, inlined, from the kept JSON embedded beside it
    import web

    assert web.read("kept_view.js") in parser.scripts[0] and "KeptView.render(" in parser.scripts[1]
    raw = parser.by_id["kept-data"]
    assert "<" not in raw  # escaped, so no token text can end the <script> early
    data = json.loads(raw)
    prompt_tokens = int(err.split("prompt tokens")[1].split()[0])
    assert data["prompt_tokens"] == len(data["tokens"]) == len(data["token_ids"]) == prompt_tokens
    assert data["tokens"][0] == "<|im_start|>" and prompt.read_text()[:200] in "".join(data["tokens"])
    assert (data["layers"], data["kv_heads"], len(data["completion_token_ids"])) == (30, 3, 4)
    assert data["kv_bytes"] < data["full_kv_bytes"]
    counts = [0] * prompt_tokens
    for heads in data["runs"]:
        for head in heads:
            assert sum(end - start for start, end in head) == 200  # the budget, in sorted disjoint runs
            assert all(a[1] < b[0] for a, b in zip(head, head[1:]))
            for start, end in head:
                counts[start:end] = [n + 1 for n in counts[start:end]]
    assert counts[-16:] == [90] * 16  # the observation window: kept by every (layer, kv head)
    assert 0 in counts and sorted(counts)[prompt_tokens // 2] < 45  # most tokens: by fewer than half of them


def test_bad_snapkv_values_exit_2(capsys, smol_dir, prompt_file):
    model = ["--model", str(smol_dir), "--prompt", str(prompt_file)]
    for args, pattern in [(["--budget", "16", "--window", "32"], "must be larger than window"),
                          (["--kernel", "4"], "odd number"),
                          (["--window", "0"], "window must be at least 1"),
                          (["--pooling", "mean"], "Invalid value for '--pooling'"),
                          (["--policy", "h2o"], "Invalid value for '--policy'")]:
        code, _, err = run_main(capsys, *model, *args)
        assert_one_line_error(code, err, pattern)


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    """Ctrl-C while the answer streams: exit code 130 and one line on stderr (scripts must not see success)."""
    import signal

    prompt = tmp_path / "p.txt"
    prompt.write_text("Tell me a very long story about a lighthouse keeper and the sea.")
    exe = ROOT / ".venv" / "bin" / "snapkv-run"
    # a terminal's Ctrl-C: SIGINT at its default, even when the suite itself runs in the background (a
    # non-interactive shell starts background jobs with SIGINT ignored, and Python then keeps it ignored)
    proc = subprocess.Popen([str(exe), "--prompt", str(prompt), "-n", "2000", "--no-snapkv"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.read(1)  # the answer has started to stream
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.decode().strip().splitlines() == ["error: interrupted"]


def test_config_and_flag_mistakes_exit_2_before_any_work(capsys, smol_dir, prompt_file, tmp_path):
    import shutil

    broken = {"missing": {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2},
              "wrong_type": {**json.loads((smol_dir / "config.json").read_text()), "hidden_size": "576"},
              "a_list": [1, 2, 3]}
    patterns = {"missing": "the field 'hidden_size' is missing", "wrong_type": r"hidden_size must be a positive "
                "integer \\(got '576'\\)", "a_list": "expected a JSON object .* got a list"}
    for name, content in broken.items():
        model = tmp_path / name
        model.mkdir()
        (model / "config.json").write_text(json.dumps(content))
        shutil.copy(smol_dir / "tokenizer.json", model)
        code, _, err = run_main(capsys, "--model", str(model), "--prompt", str(prompt_file))
        assert_one_line_error(code, err, patterns[name])
    model = ["--model", str(smol_dir), "--prompt", str(prompt_file)]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for args, pattern in [(["--show-kept", str(a_file / "view.html")], r"--show-kept .*: cannot write there"),
                          (["--show-kept", str(tmp_path)], r"--show-kept .*: is a directory"),
                          (["--prefill-chunk", "0"], "prefill_chunk_size must be a positive integer"),
                          (["-n", "8190"], r"together past the model's 8192 positions; lower max_tokens \(-n\) "
                                           r"to at most \d+")]:
        code, _, err = run_main(capsys, *model, *args)
        assert_one_line_error(code, err, pattern)


def test_help_shows_every_default():
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "snapkv-run"), "--help"], capture_output=True, timeout=60,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    text = " ".join(proc.stdout.decode().split())
    assert proc.returncode == 0
    # typer puts a default given as text in parentheses
    assert "[default: (weights/SmolLM2-135M-Instruct)]" in text and "[default: (4096 on cuda, 512 on cpu)]" in text
    from snapkv import SnapKVConfig

    defaults = SnapKVConfig()
    assert f"[default: {defaults.budget}]" in text and f"[default: {defaults.kernel}]" in text
    assert "FILE" not in text


def test_compare_runs_both_caches_and_counts_matched_tokens(capsys, tiny_chat_dir, tmp_path):
    """--compare answers with both caches in one batch, each as its own engine would, and counts the matched
    tokens (the plumbing, not the answers: a tiny random model with SmolLM2's vocabulary)."""
    from benchmarks.eval.tasks import make_case
    from engine import LLM, SamplingParams
    from compare import matched_tokens
    from snapkv import SnapKVConfig

    llm = LLM(tiny_chat_dir, max_batch_size=1)
    case = make_case("qa", 3, 700, 0.5, lambda t: len(llm.tokenizer.encode(t, add_special_tokens=False)))
    prompt = tmp_path / "long.txt"
    prompt.write_text(case.prompt)
    args = ["--model", str(tiny_chat_dir), "--prompt", str(prompt), "--max-new-tokens", "24", "--budget", "64",
            "--policy", "tova", "--compare"]
    code, out, err = run_main(capsys, *args, "--json")
    assert code == 0, err
    result = json.loads(out)
    params = SamplingParams(max_tokens=24)
    full = llm.generate(case.prompt, params, chat=True)[0]
    compressed = LLM(tiny_chat_dir, snapkv=SnapKVConfig(budget=64, policy="tova"), max_batch_size=1).generate(
        case.prompt, params, chat=True)[0]
    assert result["full"]["token_ids"] == full.token_ids
    assert result["compressed"]["token_ids"] == compressed.token_ids
    n = max(len(full.token_ids), len(compressed.token_ids))
    assert result["matched_tokens"] == matched_tokens(full.token_ids, compressed.token_ids, llm.eos_ids, n)
    assert result["compressed"]["stats"]["kept_tokens"] == 64
    code, out, err = run_main(capsys, *args)
    assert code == 0 and out.startswith("full cache: KV ") and full.text.strip() in out
    assert "tova (budget 64): KV " in out and f"matched tokens: {result['matched_tokens']} of {n}" in out
    code, out, err = run_main(capsys, *args, "--no-snapkv")
    assert_one_line_error(code, err, "--compare compares a compressed cache with the full one")

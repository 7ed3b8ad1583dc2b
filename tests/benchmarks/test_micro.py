import pytest

from deepfusion.benchmarks.micro import bench_distill, bench_experts


def test_experts_bench_times_every_kernel_of_both_families():
    rows = bench_experts(size="tiny", vocab=64, batch=2, seq=8, repeats=1)
    assert {(r["family"], r["experts_impl"]) for r in rows} == {
        (f, i) for f in ("qwen_moe", "deepseek_moe") for i in ("eager", "grouped_mm", "batched_mm")}
    assert all(r["seconds_per_step"] > 0 for r in rows)


def test_distill_bench_reports_ratios():
    rows = bench_distill(devices=2, vocab=64, blocks=4, seq=8, repeats=1, size="tiny")
    assert [r["method"] for r in rows] == ["proxy-only", "device-kd", "multiround-views"]
    assert rows[0]["ratio_to_proxy_only"] == 1.0


def test_poison_bench_compares_against_the_clean_run(tmp_path, smoke_config, shared_prepare_data):
    import tomllib

    from deepfusion.benchmarks.micro import bench_poison
    from deepfusion.config import default_config_path

    text = default_config_path("smoke-multiround").read_text().replace('seed = 0\nseq_len', f'seed = 0\ndir = "{smoke_config.data.dir}"\nseq_len')
    text = text.replace("rounds = 2", "rounds = 1")  # four runs: the comparison's shape, not its numbers
    cfg = tmp_path / "smoke.toml"
    cfg.write_text(text)
    assert tomllib.loads(text)["data"]["dir"]
    rows = bench_poison(tmp_path, attacks=("inverted",), victim="cdc", config=cfg)
    assert [(r["attack"], r["reliability"]) for r in rows] == [("none", True), ("none", False), ("inverted", True),
                                                               ("inverted", False)]
    assert rows[0]["damage_pct"] == {"medical": 0.0, "finance": 0.0}


def test_a_micro_benchmark_runs_through_deepfusion_bench(monkeypatch, capsys):
    import json

    from deepfusion.benchmarks import micro
    from deepfusion.cli import main

    monkeypatch.setattr(micro, "bench_distill", lambda: [{"method": "proxy-only", "seconds_per_step": 0.1}])
    assert main(["bench", "distill"]) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == [{"method": "proxy-only",
                                                                             "seconds_per_step": 0.1}]


@pytest.mark.parametrize("args, says", [
    (["experts", "--profile", "quick"], "give one of them"),
    (["--profile", "scale"], "--out DIR is required"),
    (["dp", "--seeds", "1", "2"], "--seeds is a profile's"),
    (["--profile", "quick", "--out", "x", "--seed", "1"], "--seed is the dp micro-benchmark's"),
])
def test_python_m_benchmarks_is_deepfusion_bench_and_says_what_a_mix_of_arguments_means(args, says):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "deepfusion.benchmarks", *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("deepfusion: ") and says in done.stderr and len(done.stderr.splitlines()) == 1


def test_align_bench_times_a_teacher_with_each_byo_tokenizer_against_the_global_one(tmp_path, data_dir):
    from deepfusion.benchmarks.micro import bench_align
    from deepfusion.config import default_config_path

    cfg = tmp_path / "smoke.toml"
    cfg.write_text(default_config_path("smoke").read_text().replace("[data]\n", f'[data]\ndir = "{data_dir}"\n', 1))
    rows = bench_align(tmp_path, repeats=1, blocks=4, teacher=("gpt2", "tiny"), config=cfg)
    rows, labels = rows[:4], rows[4:]
    assert [r["teacher"] for r in rows] == ["gpt2/tiny global tokenizer", "gpt2/tiny bpe-6000", "gpt2/tiny unigram-4000",
                                            "gpt2/tiny wordpiece-3000"]
    assert rows[0]["aligned_share"] == 1.0 and rows[0]["ratio"] == 1.0
    assert all(0 < r["aligned_share"] < 1.0 and r["align_seconds_per_64_blocks"] > 0 for r in rows[1:])
    assert all(r["seconds_per_step"] > 0 and r["cpu_ratio"] > 0 for r in rows)
    assert (tmp_path / "tokenizers" / "unigram-4000" / "tokenizer.json").is_file()  # kept for the byo bench's reuse
    assert [r["device"] for r in labels] == [r["teacher"] for r in rows]  # the multi-round side, same tokenizers
    assert labels[0]["packet_ratio"] == 1.0 and labels[0]["positions_spoken"] == 1.0
    assert all(r["packet_ratio"] > 1.0 and 0 < r["positions_spoken"] < 1.0 for r in labels[1:])  # mask + digest

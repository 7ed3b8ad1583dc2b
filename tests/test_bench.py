from deepfusion.bench import bench_distill, bench_experts


def test_experts_bench_times_every_kernel_of_both_families():
    rows = bench_experts(size="tiny", vocab=64, batch=2, seq=8, repeats=1)
    assert {(r["family"], r["experts_impl"]) for r in rows} == {
        (f, i) for f in ("qwen_moe", "deepseek_moe") for i in ("eager", "grouped_mm", "batched_mm")}
    assert all(r["seconds_per_step"] > 0 for r in rows)


def test_distill_bench_reports_ratios():
    rows = bench_distill(devices=2, vocab=64, blocks=4, seq=8, repeats=1, size="tiny")
    assert [r["method"] for r in rows] == ["proxy-only", "device-kd", "deepfusion"]
    assert rows[0]["ratio_to_proxy_only"] == 1.0

import pytest

from deepfusion.config import default_config_path, load_config
from deepfusion.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


DEVICE = '[[devices]]\nid = "a"\nsource = "medquad:cdc"\n'


def test_shipped_configs_parse():
    shipped = sorted(default_config_path("smoke").parent.glob("*.toml"))
    assert {"multiround", "smoke", "smoke-multiround", "bench-quick", "reliability"} <= {p.stem for p in shipped}
    for path in shipped:
        assert load_config(path).devices, path


def test_multiround_config_is_a_real_federation():
    cfg = load_config(default_config_path("multiround"))
    assert cfg.method == "multiround-views"
    families = {d.family for d in cfg.devices}
    sizes = {d.size for d in cfg.devices}
    sources = [d.source for d in cfg.devices]
    assert len(cfg.devices) >= 6 and len(families) >= 2 and len(sizes) >= 2
    assert sum(s.startswith("medquad:") for s in sources) >= 2 and sum(s.startswith("tatqa:") for s in sources) >= 2
    assert (cfg.server.family, cfg.server.size) == ("qwen_moe", "small")


def test_cli_overrides_apply(tmp_path):
    cfg = load_config(write(tmp_path, DEVICE), method="device-kd", rounds=7, seed=3)
    assert (cfg.method, cfg.rounds, cfg.seed) == ("device-kd", 7, 3)


@pytest.mark.parametrize("text, names", [
    ('bogus = 1\n' + DEVICE, ["bogus", "allowed"]),
    ('[server]\nlam = -1.0\n' + DEVICE, ["[server]", "lam", "-1.0"]),
    ('[server]\nfamily = "gpt"\n' + DEVICE, ["family", "'gpt'", "qwen_moe"]),
    ('[knowledge]\ntopk = "8"\n' + DEVICE, ["topk", "'8'", "int"]),
    ('[data]\nproxy_frac = 0.9\n' + DEVICE, ["proxy_frac", "0.9"]),
    ('method = "fedprox"\n' + DEVICE, ["method", "fedprox", "deepfusion", "multiround-views"]),
    ('[server]\nviews_mix = 1.5\n' + DEVICE, ["[server] views_mix = 1.5", "[0, 1]"]),
    ('[server]\nviews_final = "mean"\n' + DEVICE, ["views_final", "devices, average"]),
    ('[server]\nvaa_mix = 0.5\n' + DEVICE, ["unknown key 'vaa_mix'", "views_mix"]),  # renamed: the old key is refused
    ('rounds = 0\n' + DEVICE, ["rounds", "0"]),
    (DEVICE + 'family = "mamba"\n', ["[[devices]] #1 (id 'a') family = 'mamba'"]),  # counted from 1, named by id
    (DEVICE + 'size = "huge"\n', ["[[devices]] #1 (id 'a') size = 'huge'"]),
    (DEVICE + 'size = "auto"\n', ["memory_mb"]),
    (DEVICE + DEVICE, ["[[devices]] #2 (id 'a') id = 'a'", "unique"]),
    ('[[devices]]\nid = "a"\n', ["[[devices]] #1 (id 'a') missing required key 'source'"]),
    (DEVICE + '[[devices]]\nsource = "medquad:cdc"\n', ["[[devices]] #2 missing required key 'id'"]),
    ('name = "x"\n', ["at least one"]),
    ('[server]\nmin_devices = 5\n' + DEVICE, ["min_devices", "5"]),
    ('device = "tpu"\n' + DEVICE, ["device", "tpu"]),
])
def test_bad_configs_name_the_key_and_value(tmp_path, text, names):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    for name in names:
        assert name in str(err.value)


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "rounds = = 2"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_int_is_accepted_for_float_but_bool_is_not(tmp_path):
    assert load_config(write(tmp_path, '[server]\nlr = 1\n' + DEVICE)).server.lr == 1.0
    with pytest.raises(ConfigError, match="reliability"):
        load_config(write(tmp_path, '[server]\nreliability = 1\n' + DEVICE))


def test_dotted_overrides_reach_any_section_and_are_validated():
    from deepfusion.config import default_config_path, load_config
    from deepfusion.errors import ConfigError

    path = default_config_path("smoke")
    cfg = load_config(path, ["tune.loss=ce", "distill.alpha=0.5", "seed=3", "clustering.method=random"])
    assert (cfg.tune.loss, cfg.distill.alpha, cfg.seed, cfg.clustering.method) == ("ce", 0.5, 3, "random")
    with pytest.raises(ConfigError, match=r"\[tune\] loss = 'mse': allowed: keep, ce"):
        load_config(path, ["tune.loss=mse"])
    with pytest.raises(ConfigError, match=r"unknown key 'alfa'"):
        load_config(path, ["distill.alfa=1"])
    with pytest.raises(ConfigError, match=r"no section \[vaa\]"):
        load_config(path, ["vaa.alpha=1"])
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        load_config(path, ["distill.alpha"])


def test_loading_a_config_does_not_load_torch():
    # The config is the boundary every command and the Flower run config cross first: it must stay light.
    import subprocess
    import sys

    code = ("import sys; from deepfusion.config import load_config; load_config(sys.argv[1]); "
            "print(sorted(m for m in ('torch', 'transformers', 'flwr', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(default_config_path("smoke"))], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_configs_built_or_replaced_in_code_are_validated_too():
    import dataclasses

    from deepfusion.config import DeviceConfig, from_dict, to_dict
    from deepfusion.pipeline_config import DistillConfig

    cfg = load_config(default_config_path("smoke"))
    with pytest.raises(ConfigError, match=r"\[server\] lam = -1.0"):
        dataclasses.replace(cfg.server, lam=-1.0)
    with pytest.raises(ConfigError, match=r"\[distill\] patches = 30: must be a multiple of stages = 4"):
        DistillConfig(patches=30)
    with pytest.raises(ConfigError, match=r"\[\[devices\]\] \(id 'x'\) family = 'mamba'"):  # no place in a file
        DeviceConfig(id="x", source="medquad:cdc", family="mamba")
    with pytest.raises(ConfigError, match="at least one"):
        dataclasses.replace(cfg, devices=[])
    cfg.server.min_devices = len(cfg.devices) + 1  # assigned after construction: caught when the whole is rebuilt
    with pytest.raises(ConfigError, match="min_devices"):
        dataclasses.replace(cfg)
    cfg.server.min_devices = 1
    assert from_dict(to_dict(cfg)) == cfg


def test_a_config_saved_before_the_knowledge_section_still_reads_back():
    # checkpoints and summary.json files written before [knowledge] had topk and temperature under [server]
    from deepfusion.config import from_dict, to_dict

    cfg = load_config(default_config_path("smoke-multiround"), ["knowledge.topk=6", "knowledge.temperature=2.0"])
    old = to_dict(cfg)
    old["server"].update(old.pop("knowledge"))
    assert from_dict(old) == cfg

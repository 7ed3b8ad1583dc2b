"""Every user-facing error is one clear line on stderr and exit code 2, never a traceback.

Each case goes through the real command line (`deepfusion.cli.main`), on small corpora written here, so the
suite needs no shared data for them.
"""

import random

import pytest

from deepfusion.cli import main

WORDS = "the heart lungs blood pressure report revenue profit patient doctor table assets year cost".split()


def corpus(root, n_docs=12):
    """A data dir (resolve_data_dir wants medquad/ or tatqa/ in it) with a text: source of n_docs files."""
    (root / "tatqa").mkdir(parents=True, exist_ok=True)
    text = root / "notes"
    text.mkdir(exist_ok=True)
    rng = random.Random(0)
    for i in range(n_docs):
        (text / f"{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(300)))
    return text


def config(tmp_path, top="", server="", device="", source=None):
    """A tiny valid federation over that corpus, plus the given lines at the top, in [server], in the device."""
    path = tmp_path / "c.toml"
    source = source or corpus(tmp_path / "data")
    top = top if "rounds" in top else top + "rounds = 1\n"
    top = top if "method" in top else top + 'method = "multiround-views"\n'
    device = device or 'size = "tiny"\nbatch_size = 2'
    path.write_text(f'{top}[data]\nseq_len = 16\nproxy_blocks = 4\ntest_blocks = 2\nvocab_size = 300\n'
                    f'[server]\nsize = "tiny"\nsteps = 1\nbatch_size = 2\n{server}'
                    f'[[devices]]\nid = "a"\nsource = "text:{source}"\ndomain = "notes"\nlocal_steps = 1\n'
                    f'{device}\n')
    return path


def fails_with_one_line(capsys, argv, *needles):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    # stderr also carries the run's log lines (stdout is for results): the error is its one last line
    assert lines and lines[-1].startswith("deepfusion: ") and sum(x.startswith("deepfusion:") for x in lines) == 1, err
    assert "Traceback" not in out + err and out == "", (out, err)
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def test_the_test_federation_is_valid(tmp_path):
    """The fixture itself loads, so each case below fails for its one defect only."""
    from deepfusion.config import load_config
    from deepfusion.federation import prepare_data

    data = prepare_data(load_config(config(tmp_path)), tmp_path / "data")
    assert len(data.proxy) and len(data.private["a"])


def test_bad_toml(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("rounds = = 2\n")
    fails_with_one_line(capsys, ["run", "--config", path, "--out", tmp_path / "o"], "not valid TOML", str(path))


def test_missing_config_file(tmp_path, capsys):
    fails_with_one_line(capsys, ["run", "--config", tmp_path / "nope.toml", "--out", tmp_path / "o"], "not found")


@pytest.mark.parametrize("edit, needles", [
    (dict(server='family = "gpt"\n'), ["[server] family = 'gpt'", "qwen_moe"]),  # unknown global family
    (dict(device='family = "mamba"'), ["[[devices]] #1 (id 'a') family = 'mamba'", "qwen2"]),  # unknown device family
    (dict(device='size = "huge"'), ["[[devices]] #1 (id 'a') size = 'huge'", "tiny"]),
    (dict(device='size = "tiny"\n[[devices]]\nid = "b"\nsource = "medquad:cdc"\nsize = "huge"'),
     ["[[devices]] #2 (id 'b') size = 'huge'"]),  # the second device is #2, not [devices.1]
    (dict(top='rounds = "many"\n'), ["rounds = 'many'", "int"]),
    (dict(server="lam = -1.0\n"), ["[server] lam = -1.0", ">= 0"]),
])
def test_bad_config_values(tmp_path, capsys, edit, needles):
    fails_with_one_line(capsys, ["run", "--config", config(tmp_path, **edit), "--out", tmp_path / "o"], *needles)


def test_the_one_shot_pipeline_fails_in_one_line_and_leaves_nothing(tmp_path, capsys):
    """`deepfusion` (the paper's pipeline) on a data directory without its sources: one line, no run directory."""
    fails_with_one_line(capsys, ["run", "--config", config(tmp_path, top='method = "deepfusion"\n'), "--data-dir",
                                 tmp_path / "nowhere", "--out", tmp_path / "o"], "nowhere")
    assert not (tmp_path / "o").exists()


def test_memory_budget_too_small_for_any_model(tmp_path, capsys):
    path = config(tmp_path, device='size = "auto"\nmemory_mb = 1\nbatch_size = 64')
    fails_with_one_line(capsys, ["run", "--config", path, "--data-dir", tmp_path / "data",
                                 "--out", tmp_path / "o", "--no-progress"], "memory_mb = 1", "fits no qwen2 preset", "'tiny', needs", "MB")


def test_missing_data_dir(tmp_path, capsys):
    fails_with_one_line(capsys, ["run", "--config", config(tmp_path), "--data-dir", tmp_path / "nowhere",
                                 "--out", tmp_path / "o"], "nowhere")


def test_missing_source_folder(tmp_path, capsys):
    corpus(tmp_path / "data")
    fails_with_one_line(capsys, ["run", "--config", config(tmp_path, source=tmp_path / "gone"), "--data-dir",
                                 tmp_path / "data", "--out", tmp_path / "o"], "gone", "no such folder")


@pytest.mark.parametrize("where, content, needle", [
    ("notes/bad.txt", b"caf\xe9 au lait", "not UTF-8"),
    ("medquad/9_CDC_QA/0.xml", b"<Document><QAPairs><QAPair", "not well-formed XML"),
    ("tatqa/tatqa_dataset_dev.json", b'[{"table": ', "bad JSON"),
])
def test_corrupt_data_file(tmp_path, capsys, where, content, needle):
    cfg = config(tmp_path)
    if not where.startswith("notes"):  # point the device at the corrupt upstream file instead
        source = "medquad:cdc" if "medquad" in where else "tatqa:0/1"
        cfg.write_text(cfg.read_text().replace(f'source = "text:{tmp_path / "data" / "notes"}"', f'source = "{source}"'))
    (tmp_path / "data" / where).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / where).write_bytes(content)
    fails_with_one_line(capsys, ["run", "--config", cfg, "--data-dir", tmp_path / "data", "--out", tmp_path / "o"],
                        needle, where.split("/")[-1])


def test_corrupt_checkpoint(tmp_path, capsys):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.pt").write_bytes(b"\x80\x02 not a checkpoint")
    fails_with_one_line(capsys, ["run", "--resume", tmp_path], "state.pt", "unreadable")


def test_resume_without_checkpoint(tmp_path, capsys):
    fails_with_one_line(capsys, ["run", "--resume", tmp_path], "no checkpoint")


def test_eval_of_a_missing_model(tmp_path, capsys):
    fails_with_one_line(capsys, ["eval", "--model", tmp_path / "nomodel", "--config", config(tmp_path)], "no exported model")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has the GPU the config asks for")
def test_a_gpu_the_machine_does_not_have(tmp_path, capsys):
    path = config(tmp_path, top='device = "cuda"\n')
    fails_with_one_line(capsys, ["run", "--config", path, "--data-dir", tmp_path / "data", "--out", tmp_path / "o"],
                        "device = 'cuda'", "no CUDA GPU")


def test_an_output_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a directory")
    fails_with_one_line(capsys, ["run", "--config", config(tmp_path), "--data-dir", tmp_path / "data",
                                 "--out", tmp_path / "taken"], "taken")


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs (needs root); elsewhere mkdir is made to fail as a read-only disk does."""
    import os
    import subprocess

    where = tmp_path / "ro"
    where.mkdir()
    if os.geteuid() == 0 and not subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(where)],
                                                capture_output=True).returncode:
        yield where
        subprocess.run(["umount", str(where)], check=True)
        return
    import errno
    from pathlib import Path

    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(where)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(Path, "mkdir", mkdir)
    yield where
    mp.undo()


def test_os_errors_are_plain_words(tmp_path, capsys, read_only_dir):
    """Not "[Errno 30] Read-only file system: '...'"."""
    line = fails_with_one_line(capsys, ["run", "--config", config(tmp_path), "--data-dir", tmp_path / "data",
                                        "--out", read_only_dir / "run"],
                               f"cannot write to {read_only_dir / 'run'}: read-only file system")
    assert "Errno" not in line

"""petpipe.run.lineage: what one pipeline execution is, the dvc.yaml graph, DVC's digests."""

from conftest import ROOT

from petpipe.run import files, lineage


def test_dvc_is_recognised_however_it_was_started():
    assert lineage.is_dvc_command(["/venv/bin/dvc", "repro"]) and lineage.is_dvc_command(
        ["python", "-m", "dvc", "exp", "run"]
    )
    assert lineage.is_dvc_command(["/usr/bin/python3", "/venv/bin/dvc", "exp", "exec-run"])
    assert not lineage.is_dvc_command(["/bin/sh", "-c", "python stages/fetch.py --dataset data/dataset"])


def test_every_stage_process_of_one_dvc_process_gets_the_same_execution_key(tmp_path):
    """Two children of one `dvc` process (as stages are) share a key; another `dvc` process gets another."""
    import subprocess
    import sys

    fake_dvc = tmp_path / "dvc"
    fake_dvc.write_text(
        "import subprocess, sys\n"
        "code = 'from petpipe.run.lineage import execution_key; print(execution_key({}))'\n"
        "for _ in range(2):\n"
        "    subprocess.run(['/bin/sh', '-c', f'{sys.executable} -c \"{code}\"'], check=True)\n"
    )
    keys = [
        subprocess.run([sys.executable, str(fake_dvc)], capture_output=True, text=True, check=True).stdout.split()
        for _ in range(2)
    ]
    assert keys[0][0] == keys[0][1] and keys[1][0] == keys[1][1] and keys[0][0] != keys[1][0]
    assert lineage.execution_key({"PETPIPE_EXECUTION": "mine"}) == "mine"


def test_upstream_params_follow_the_dvc_yaml_graph():
    stages = lineage.load_stages(ROOT / "dvc.yaml")
    assert lineage.upstream(stages, "presize") == ["fetch", "labels"]
    assert lineage.upstream(stages, "fetch") == []
    resolved = {
        "data.url": "u",
        "labels.rule": "folder",
        "presize.size": 64,
        "train_frozen.lr": 0.01,
        "finetune.epochs": 2,
        "report.top_losses": 9,
    }
    assert lineage.lineage_params(stages, "presize", resolved) == {
        "data.url": "u",
        "labels.rule": "folder",
        "presize.size": 64,
    }
    assert set(lineage.lineage_params(stages, "finetune", resolved)) == set(resolved) - {"report.top_losses"}


def test_digests_are_dvcs(tmp_path):
    """A file's MD5, a folder's ``<md5 of its listing>.dir``: what dvc.lock records (checked against dvc-data)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import localfs

    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "d" / "sub" / "b.bin").write_bytes(b"\0\1")
    odb = HashFileDB(localfs, str(tmp_path / "odb"))
    _, _, obj = build(odb, str(tmp_path / "d"), localfs, "md5")
    assert lineage.dvc_digest(tmp_path / "d") == obj.hash_info.value
    assert lineage.dvc_digest(tmp_path / "d" / "a.txt") == "0cc175b9c0f1b6a831c399e269772661"
    assert lineage.dvc_digest(tmp_path / "missing") is None


def test_a_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "final.pt"
    path.write_bytes(b"a")
    reads = []
    monkeypatch.setattr(lineage, "md5_of", lambda p: reads.append(p) or files.md5_of(p))
    assert lineage.dvc_digest(path) == lineage.dvc_digest(path) == "0cc175b9c0f1b6a831c399e269772661"
    assert len(reads) == 1
    files.write_bytes(path, b"b")  # an atomic rewrite, as every output writer does
    assert lineage.dvc_digest(path) == "92eb5ffee6ae2fec3ad71c777531578f" and len(reads) == 2

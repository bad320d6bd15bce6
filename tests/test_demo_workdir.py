from proxy.demo.run import _prepare_workdir


def test_earlier_audit_trail_moved_aside(tmp_path):
    (tmp_path / "audit.jsonl").write_text('{"seq": 1}\n')

    policy_path = _prepare_workdir(tmp_path)

    assert not (tmp_path / "audit.jsonl").exists()
    assert (tmp_path / "audit-previous.jsonl").read_text() == '{"seq": 1}\n'
    assert policy_path == tmp_path / "healthcare.yaml"


def test_server_data_emptied(tmp_path):
    (tmp_path / "secantus-data").mkdir()
    (tmp_path / "secantus-data" / "old").write_text("x")

    _prepare_workdir(tmp_path)

    assert not (tmp_path / "secantus-data").exists()

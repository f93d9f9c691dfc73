"""logger.py: each run claims a folder of its own, when it first needs one."""

from mnist_lit.logger import RunLogger, claim_next_folder


def test_claims_the_number_after_the_highest_and_skips_taken_ones(tmp_path):
    assert claim_next_folder(tmp_path) == 0
    (tmp_path / "version_5").mkdir()
    assert claim_next_folder(tmp_path) == 6
    assert claim_next_folder(tmp_path, "test") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_0", "version_0", "version_5", "version_6"]


def test_a_run_folder_appears_only_when_the_run_needs_it(tmp_path):
    logger = RunLogger(save_dir=str(tmp_path))
    assert not (tmp_path / "lightning_logs").exists()
    assert logger.log_dir == str(tmp_path / "lightning_logs" / "version_0")
    assert (tmp_path / "lightning_logs" / "version_0").is_dir()
    assert RunLogger(save_dir=str(tmp_path)).version == 1  # the next logger gets the next folder


def test_an_evaluation_logger_claims_a_folder_named_after_its_command(tmp_path):
    logger = RunLogger(save_dir=str(tmp_path / "version_0"), name="", folder_prefix="test")
    assert logger.log_dir == str(tmp_path / "version_0" / "test_0")

"""Every option is checked before any work starts: a bad value is one error line naming the
option, exit code 2, and nothing is written."""
import pytest

from conftest import one_error_line, run


@pytest.mark.parametrize("args,match", [
    (["finetune", "--blocks", "5-2"], "--blocks: the range '5-2' is empty"),
    (["eval", "--blocks", "9-3"], "--blocks: the range '9-3' is empty"),
    (["eval", "--reductions", "1.5"], "--reductions must be GMACs reductions in (0, 1)"),
    (["ablate", "--reductions", "0"], "--reductions must be GMACs reductions in (0, 1)"),
    (["bench", "--reduction", "1.5"], "--reduction must be a GMACs reduction in (0, 1)"),
    (["bench", "--batch-sizes", "0"], "--batch-sizes must be >= 1"),
    (["bench", "--case", "bundled,bogus"], "--case must be one of"),
    (["train", "--limit", "0"], "--limit must be >= 1"),
    (["demo", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["demo", "--seed", "99999999999999999999"], "--seed must be in"),
    (["eval", "--device", "tpu9"], "--device must be cpu, cuda or cuda:N"),
    (["eval", "--device", "meta"], "--device must be cpu, cuda or cuda:N"),
    (["finetune", "--device", "cuda:7"], "--device must be"),
    (["eval", "--sampler", "nope"], "--sampler must be one of"),
    (["finetune", "--amp", "fp8"], "--amp must be one of"),
    (["eval", "--batch-size", "x"], "--batch-size: invalid int value"),
])
def test_bad_option_is_one_line_before_any_work(args, match, tmp_path, capsys):
    code, out, err = run(args + (["--out", str(tmp_path / "out")] if args[0] != "demo" else []), capsys)
    assert code == 2
    assert match in err and one_error_line(err), err
    assert not (tmp_path / "out").exists() and out == ""


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    taken = tmp_path / "file"
    taken.write_text("x")
    for command in ("eval", "bench", "finetune", "viz"):
        code, out, err = run([command, "--out", str(taken)], capsys)
        assert code == 2 and "--out must be a writable folder" in err and one_error_line(err), (command, err)
        assert out == ""
    code, out, err = run(["train", "--data-root", str(taken), "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and "--data-root must be a writable folder" in err and one_error_line(err), err


def test_viz_inputs_with_the_same_file_name_get_one_map_each(tiny_checkpoint, image_folder, tmp_path, capsys):
    files = [str(image_folder / "boot" / "1.png"), str(image_folder / "coat" / "1.png")]
    code, _, err = run(["viz", *files, "--model", str(tiny_checkpoint), "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["1-2_tokens.png", "1_tokens.png"]

"""The jobs checked against independent computations: eval's accuracies against counts from the
test's own reference forward, fine-tuned weights reloaded through the command line, fine-tuning
that repairs a damaged model, and DDP training equal to one process."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import ats_vit
from ats_vit.jobs.loading import first_images, load_dataset, load_model
from ats_vit.jobs.training import TrainConfig, fit
from conftest import run
from reference import reference_forward

IMAGES = 48


@pytest.fixture(scope="module")
def subset():
    """The bundled model and the first IMAGES Fashion-MNIST test images with their labels."""
    model = load_model()
    data = load_dataset("fashion-mnist", model, IMAGES)
    return model, first_images(data, IMAGES), torch.tensor([data[i][1] for i in range(IMAGES)])


def _percent_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of images whose label is among the k largest logits, counted by sorting."""
    ranked = logits.argsort(dim=-1, descending=True, stable=True)[:, :k]
    return 100.0 * sum(int(label) in row.tolist() for row, label in zip(ranked, labels)) / len(labels)


def test_eval_accuracies_equal_counts_from_the_reference_forward(subset, tmp_path, capsys):
    """Dense: the plain timm forward; ATS (released configuration): the slow per-image reference
    of tests/reference.py. eval's top-1 and top-5 must be exactly those counts."""
    model, images, labels = subset
    with torch.no_grad():
        dense = model(images)
        ats = torch.stack([reference_forward(model, images[b:b + 1], range(3, 12), None)[0].reshape(-1) for b in range(IMAGES)])
    code, _, err = run(["eval", "--limit", str(IMAGES), "--blocks", "3-11", "--workers", "0", "--timing-repeats", "1",
                        "--out", str(tmp_path)], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 2 and rows[0]["method"] == "dense", rows  # results.json rounds to 2 decimals; one image is 2.08 points
    for row, logits in zip(rows, (dense, ats)):
        assert row["top1"] == pytest.approx(_percent_correct(logits, labels, 1), abs=0.005), row["method"]
        assert row["top5"] == pytest.approx(_percent_correct(logits, labels, 5), abs=0.005), row["method"]
    assert rows[0]["top1"] != rows[1]["top1"]  # the subset tells ATS from dense


def _small_set(model, count: int, offset: int = 0):
    data = load_dataset("fashion-mnist", model, offset + count)
    images = first_images(data, offset + count)[offset:]
    return TensorDataset(images, torch.tensor([data[i][1] for i in range(offset, offset + count)]))


def test_finetuned_weights_reload_through_the_command_line_with_the_same_logits(subset, tmp_path):
    model, images, _ = subset
    tuned = ats_vit.apply(copy.deepcopy(model), num_tokens=0.5)
    fit(tuned, _small_set(model, 64, offset=1000), _small_set(model, 32), 10,
        TrainConfig(epochs=1, batch_size=32, lr=1e-3, workers=0), tmp_path, torch.device("cpu"))
    (tmp_path / "last.json").write_text(json.dumps({"model": "vit_fmnist_patch2_28"}))  # as finetune writes it
    loaded = ats_vit.apply(load_model(str(tmp_path / "last.safetensors")), num_tokens=0.5)
    tuned.eval()
    with torch.no_grad():
        assert not torch.equal(tuned(images), ats_vit.apply(copy.deepcopy(model), num_tokens=0.5)(images))  # it moved
        torch.testing.assert_close(loaded(images), tuned(images), rtol=0, atol=0)


def test_finetuning_repairs_a_damaged_head(subset, tmp_path):
    """A re-initialised head scores near chance; a short fine-tune with ATS in place lifts it."""
    model, images, labels = subset
    damaged = copy.deepcopy(model)
    torch.manual_seed(0)
    damaged.reset_classifier(10)
    ats_vit.apply(damaged, num_tokens=0.5)
    held_out = _small_set(model, 96, offset=200)
    with torch.no_grad():
        before = _percent_correct(damaged.eval()(held_out.tensors[0]), held_out.tensors[1], 1)
    fit(damaged, _small_set(model, 512, offset=2000), held_out, 10,
        TrainConfig(epochs=2, batch_size=64, lr=2e-3, warmup_epochs=0.1, workers=0), tmp_path, torch.device("cpu"))
    with torch.no_grad():
        after = _percent_correct(damaged.eval()(held_out.tensors[0]), held_out.tensors[1], 1)
    assert before < 30 and after > before + 30, (before, after)


DDP_SCRIPT = """
import sys, torch
from pathlib import Path
from torch.utils.data import TensorDataset
import ats_vit
from ats_vit.jobs.distributed import setup
from ats_vit.jobs.loading import load_model
from ats_vit.jobs.training import TrainConfig, fit

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
images, labels = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
with setup("cpu") as (d, device):
    model = ats_vit.apply(load_model(), num_tokens=0.5)
    fit(model, TensorDataset(images, labels), TensorDataset(images[:32], labels[:32]), 10,
        TrainConfig(epochs=1, batch_size=64, lr=1e-3, warmup_epochs=0, workers=0), out, device, d)
"""


@pytest.mark.slow  # over 10 s on the 2-core CPU
def test_two_process_training_takes_the_steps_of_one_process(tmp_path):
    """Same global batches (DistributedSampler splits each between the ranks), no random
    augmentation: two gloo processes must end on the weights one process reaches."""
    from safetensors.torch import load_file

    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (load_file(str(tmp_path / name / "last.safetensors")) for name in ("one", "two"))
    start = load_model().state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training moved the weights
    worst = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
    assert worst[0] <= 1e-4, worst  # AdamW moves each weight by about lr = 1e-3 per step


def test_demo_reports_the_counts_and_gmacs_an_independent_count_gives(capsys):
    """Dense GMACs from torch's flop counter; top-K at 0.6 of the entering tokens keeps exactly
    round(0.6 n) per block when every token is eligible (random weights)."""
    import timm
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ats_vit.jobs.demo import DemoOptions, run_demo

    rows = run_demo(DemoOptions(batch_size=2))
    assert "reduction" in capsys.readouterr().out
    dense = timm.create_model("deit_small_patch16_224").eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        dense(torch.randn(1, 3, 224, 224))
    assert [r["dense GMACs"] for r in rows] == [pytest.approx(counter.get_total_flops() / 2e9)] * 3
    counts, n = [], 196
    for _ in range(9):
        n = max(1, round(0.6 * n))
        counts.append(n)
    assert rows[2]["tokens kept per ATS block (mean)"] == " ".join(map(str, counts))
    assert all(r["GMACs/image"] < r["dense GMACs"] for r in rows[1:])


def test_finetune_under_bfloat16_autocast_trains_with_finite_losses(tmp_path):
    from safetensors.torch import load_file

    from ats_vit.jobs.finetune import FinetuneOptions, run_finetune

    rows = run_finetune(FinetuneOptions(num_tokens=0.5, epochs=1, batch_size=32, limit=64, workers=0, lr=1e-3,
                                        amp="bfloat16", out=str(tmp_path / "run")))
    assert len(rows) == 1 and torch.isfinite(torch.tensor(rows[0]["train_loss"]))
    tuned, start = load_file(str(tmp_path / "run" / "last.safetensors")), load_model().state_dict()
    assert all(torch.isfinite(v).all() for v in tuned.values())
    assert any(not torch.equal(tuned[k], start[k]) for k in tuned)


def test_finetune_on_an_image_folder_trains_its_classes(tiny_checkpoint, image_folder, tmp_path, capsys):
    """train/ and val/ of class folders, the model's own timm train transform, a 3-class head."""
    import shutil

    data = tmp_path / "data"
    for split in ("train", "val"):
        shutil.copytree(image_folder, data / split)
    code, _, err = run(["finetune", "--model", str(tiny_checkpoint), "--data", str(data), "--epochs", "1",
                        "--batch-size", "3", "--workers", "0", "--num-tokens", "0.5", "--out", str(tmp_path / "run")],
                       capsys)
    assert code == 0, err
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3]  # 9 images, batches of 3
    meta = json.loads((tmp_path / "run" / "last.json").read_text())
    assert meta["model"] == "vit_fmnist_patch2_28"

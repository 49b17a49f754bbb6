"""trainer.precision=32|bf16|fp16: norms and clipping on the true (unscaled) gradients, the same
metric names (fp16 adds amp/scale and amp/skipped), and steps the fp16 loss scaler skips recorded
and named by the verdict, never a failed run."""
import numpy as np
import pytest

from jobs import run_inprocess

pytestmark = pytest.mark.unit

SHORT = ["trainer.epochs=2", "tracking.log_checkpoints=false"]


def totals(outcome) -> np.ndarray:
    return np.asarray(outcome.history.history["grad_norm/total"][1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_and_fp16_norms_match_fp32_on_the_first_steps(tmp_path, seed):
    """reduction=mean (small gradients: the fp16 scaler skips nothing). Scaled gradients would be
    65,536x too large; the first steps' norms agree with fp32's to a few percent."""
    common = [*SHORT, "trainer.reduction=mean", f"trainer.seed={seed}"]
    fp32 = run_inprocess(common, tmp_path / "32", "memory")
    for precision in ("bf16", "fp16"):
        low = run_inprocess([*common, f"trainer.precision={precision}"], tmp_path / precision, "memory")
        assert low.status == "FINISHED"
        ratio = totals(low)[:3] / totals(fp32)[:3]
        assert np.all(np.abs(ratio - 1) < 0.05), (precision, ratio)
        extra = ["amp/scale", "amp/skipped"] if precision == "fp16" else []
        assert low.history.names == fp32.history.names[:5] + extra + fp32.history.names[5:] if extra \
            else low.history.names == fp32.history.names
        if precision == "fp16":
            assert not np.any(low.history.history["amp/skipped"][1])


def test_fp16_skipped_steps_are_recorded_and_named_not_failed(tmp_path):
    """The default job (reduction=sum, gradients in the hundreds): at the initial scale 65,536 its
    gradients overflow fp16; the scaler skips those steps and halves the scale."""
    out = run_inprocess([*SHORT, "trainer.precision=fp16"], tmp_path, "memory")
    assert out.status == "FINISHED"
    h = out.history.history
    scale, skipped, total = (np.asarray(h[k][1]) for k in ("amp/scale", "amp/skipped", "grad_norm/total"))
    assert scale[0] == 65536.0 and skipped.sum() >= 1
    for i in np.flatnonzero(skipped[:-1]):  # a skip halves the scale for the next step
        assert scale[i + 1] == scale[i] / 2
    assert not np.all(np.isfinite(total[skipped > 0]))  # why they were skipped
    assert np.all(np.isfinite(total[skipped == 0]))
    assert "skipped_steps" in out.health.verdicts and "nonfinite" not in out.health.verdicts
    assert out.health.metrics["health/skipped_steps"] == skipped.sum()


@pytest.mark.integration  # starts Python processes (train.py or the delivery process)
def test_bad_precision_is_one_line(tmp_path):
    from conftest import run_train

    res = run_train(["trainer.precision=fp8", "tracking.backend=memory"], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == "error: trainer.precision='fp8' is invalid; allowed: 32|bf16|fp16"

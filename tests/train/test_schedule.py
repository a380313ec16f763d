"""WSD: values at the phase boundaries and against the spec formulas, LambdaLR use, mid-decay resume, branching."""

import math
import pickle

import pytest
import torch

from longcpm.train.schedule import WSD, set_scheduler_step, wsd_lr, wsd_scheduler


def test_phases_and_boundaries():
    s = WSD(total_steps=100, warmup_steps=10, decay_fraction=0.2, shape="linear", final_ratio=0.1)
    assert s.decay_begin == 80 and s.decay_length == 20
    assert s(0) == 0.0 and s(5) == 0.5 and s(9) == pytest.approx(0.9)
    assert s(10) == 1.0 and s(79) == 1.0 and s(80) == 1.0
    assert s(90) == pytest.approx(0.55) and s(100) == pytest.approx(0.1) and s(150) == pytest.approx(0.1)
    assert [s.phase(i) for i in (0, 9, 10, 79, 80)] == ["warmup", "warmup", "stable", "stable", "decay"]


def test_exp_half_life_form():
    # spec §1: f(τ) = 0.5^(τ/T_half); D = 3.3·T_half ends near 0.1
    s = WSD(total_steps=1000, warmup_steps=0, decay_steps=330, shape="exp", half_life=100)
    for tau in (0, 1, 50, 100, 200, 330):
        assert s(670 + tau) == pytest.approx(0.5 ** (tau / 100), rel=1e-12)
    assert s(1000) == pytest.approx(0.1, rel=0.02)
    r = WSD(total_steps=1000, decay_steps=200, shape="exp", final_ratio=0.03)
    assert r(1000) == pytest.approx(0.03, rel=1e-12)
    assert r.t_half == pytest.approx(200 * math.log(2) / math.log(1 / 0.03))


def test_linear_matches_bmtrain_drop_and_cosine_formula():
    s = WSD(total_steps=50, warmup_steps=5, decay_steps=20, shape="linear", final_ratio=0.1)
    for it in range(30, 51):  # WarmupStableDrop: 0.1 + max(0.9·(end − it)/drop_iter, 0)
        assert s(it) == pytest.approx(0.1 + max(0.9 * (50 - it) / 20, 0), rel=1e-12)
    c = WSD(total_steps=50, decay_steps=20, shape="cosine", final_ratio=0.0)
    for it in range(30, 51):
        assert c(it) == pytest.approx(0.5 * (1 + math.cos(math.pi * (it - 30) / 20)), abs=1e-12)


def test_wsd_lr_and_validation():
    assert wsd_lr(3, 0.01, total_steps=10, warmup_steps=6) == pytest.approx(0.005)
    with pytest.raises(ValueError, match="inside the warmup"):
        WSD(total_steps=10, warmup_steps=5, decay_steps=8)
    with pytest.raises(ValueError, match="shape"):
        WSD(total_steps=10, shape="step")


def _opt():
    p = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [p], "lr": 0.01}, {"params": [torch.nn.Parameter(torch.zeros(1))],
                                                               "lr": 0.0025}])


def test_lambdalr_mid_decay_resume_and_pickle():
    sched_fn = WSD(total_steps=40, warmup_steps=4, decay_steps=16, shape="exp", final_ratio=0.1)
    assert pickle.loads(pickle.dumps(sched_fn)) == sched_fn
    opt = _opt()
    sched = wsd_scheduler(opt, sched_fn)
    straight = []
    for _ in range(40):
        straight.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    # stop in the middle of the decay, save, rebuild and load
    opt2 = _opt()
    s2 = wsd_scheduler(opt2, sched_fn)
    for _ in range(31):
        opt2.step()
        s2.step()
    state = s2.state_dict()
    opt3 = _opt()
    s3 = torch.optim.lr_scheduler.LambdaLR(opt3, WSD(total_steps=1))
    s3.load_state_dict(pickle.loads(pickle.dumps(state)))
    set_scheduler_step(s3, s3.last_epoch)
    resumed = []
    for _ in range(31, 40):
        resumed.append([g["lr"] for g in opt3.param_groups])
        opt3.step()
        s3.step()
    assert resumed == straight[31:]
    assert straight[35][1] == pytest.approx(0.0025 * sched_fn(35))


def test_branch_decay_from_stable_checkpoint():
    trunk = WSD(total_steps=10_000, warmup_steps=10, decay_steps=0)
    branch = WSD(total_steps=700, warmup_steps=10, decay_start=600, shape="exp", final_ratio=0.1)
    assert all(trunk(s) == branch(s) for s in range(600))
    assert branch(600) == 1.0 and branch(700) == pytest.approx(0.1)
    opt = _opt()
    sched = wsd_scheduler(opt, branch, last_step=650)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * branch(650))
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * branch(651))

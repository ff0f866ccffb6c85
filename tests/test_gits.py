import itertools
import json
import math

import pytest
import torch

from schedsearch import gits, schedules
from schedsearch.models.gmm import GaussianMixture
from schedsearch.teacher import TeacherGrid, trajectories

N, K, S = 12, 3, 16


def _teacher(model):
    return trajectories(model, [i % 4 for i in range(S)], list(range(S)), guidance=3.0,
                        grid=TeacherGrid(steps=N), use_cache=False)


@pytest.fixture(scope="module")
def teacher():
    return _teacher(GaussianMixture.default())


def test_cost_matrix_is_the_euler_jump_error(teacher):
    C = gits.cost_matrix(teacher)
    assert C.shape == (N + 1, N + 1)
    upper = torch.ones(N + 1, N + 1, dtype=torch.bool).triu()      # j >= i: no jump
    assert bool(torch.isinf(C[upper]).all()) and bool(torch.isfinite(C[~upper]).all())
    x, D, T = teacher.x.double(), teacher.denoised.double(), teacher.sigmas
    for i, j in [(N, 0), (N, 5), (7, 6), (3, 0), (1, 0)]:
        slope = (x[:, i] - D[:, i]) / T[i]                      # dx/dσ of the VE ODE
        jump = x[:, i] + (T[j] - T[i]) * slope
        want = (jump - x[:, j]).norm(dim=1).mean()
        assert float(C[i, j]) == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    # one grid step from the teacher's own state is the teacher's own step: zero cost
    assert float(C.diagonal(-1).max()) < 1e-5


@pytest.mark.parametrize("coeff", [1.0, 1.2, 2.0])
def test_shortest_path_equals_brute_force(teacher, coeff):
    C = gits.cost_matrix(teacher)
    path, cost = gits.shortest_path(C, K, coeff)
    best, best_path = float("inf"), None
    for mid in itertools.combinations(range(1, N), K - 1):
        p = (N, *sorted(mid, reverse=True), 0)
        c = sum(coeff ** m * float(C[a, b]) for m, (a, b) in enumerate(zip(p, p[1:])))
        if c < best:
            best, best_path = c, list(p)
    assert path == best_path
    assert cost == pytest.approx(best, rel=1e-12)


def test_coeff_pushes_steps_toward_low_noise(teacher):
    C = gits.cost_matrix(teacher)
    low, _ = gits.shortest_path(C, K, 1.0)
    high, _ = gits.shortest_path(C, K, 3.0)
    assert sum(high) < sum(low)


def test_gits_result(teacher):
    res = gits.search(teacher, K)
    assert res.steps == K and float(res.sigmas[-1]) == 0.0
    idx = torch.tensor(res.provenance["grid_indices"])
    torch.testing.assert_close(res.sigmas, teacher.sigmas[idx])
    schedules.explicit(res.sigmas)
    assert res.provenance["calls_per_sample"]["search"] == 0
    assert res.provenance["path_cost"] == pytest.approx(
        sum(1.2 ** m * c for m, c in enumerate(res.provenance["step_costs"])))
    json.dumps(res.as_json())
    with pytest.raises(ValueError, match="must be smaller than the teacher's N = 12"):
        gits.search(teacher, 12)
    for bad in (0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="coeff must be a finite number > 0"):
            gits.search(teacher, K, coeff=bad)


def test_cli_gits(tmp_path, capsys):
    from schedsearch.cli import main

    argv = ["gits", "--model", "gmm", "--budget", "4", "--coeff", "1.5", "--teacher-steps", "12",
            "--n", "8", "--cache-dir", str(tmp_path), "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["sigmas"]) == 5 and out["provenance"]["coeff"] == 1.5
    assert out["model_calls_per_sample"]["search"] == 0
    assert main(["teacher", "--model", "gmm", "--teacher-steps", "12", "--n", "8",
                 "--cache-dir", str(tmp_path), "--no-progress", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["from_cache"] is True


# -- flow-matching models: the grid starts at σ = ∞ ------------------------------------------------

@pytest.fixture(scope="module")
def flow_teacher():
    from schedsearch.models.gmm_flow import FlowGaussianMixture

    return _teacher(FlowGaussianMixture.default())


def test_flow_cost_from_infinity_is_the_limit_jump(flow_teacher):
    C = gits.cost_matrix(flow_teacher)
    upper = torch.ones(N + 1, N + 1, dtype=torch.bool).triu()
    assert bool(torch.isinf(C[upper]).all()) and bool(torch.isfinite(C[~upper]).all())
    x, D, T = flow_teacher.x.double(), flow_teacher.denoised.double(), flow_teacher.sigmas
    assert math.isinf(float(T[N]))
    for j in (0, 3, 11):   # from ∞ the state is ε: the jump lands at D + σ_j·ε
        want = (D[:, N] + T[j] * x[:, N] - x[:, j]).norm(dim=1).mean()
        assert float(C[N, j]) == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    for i, j in [(7, 6), (3, 0), (11, 2)]:
        slope = (x[:, i] - D[:, i]) / T[i]
        want = (x[:, i] + (T[j] - T[i]) * slope - x[:, j]).norm(dim=1).mean()
        assert float(C[i, j]) == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    assert float(C.diagonal(-1).max()) < 1e-5     # the teacher's own step, from ∞ included


@pytest.mark.parametrize("coeff", [1.0, 1.2, 2.0])
def test_flow_shortest_path_equals_brute_force(flow_teacher, coeff):
    test_shortest_path_equals_brute_force(flow_teacher, coeff)
    res = gits.search(flow_teacher, K, coeff=coeff)
    assert math.isinf(float(res.sigmas[0])) and float(res.sigmas[-1]) == 0.0
    schedules.flow_explicit(res.sigmas)
    assert res.provenance["calls_per_sample"] == {"teacher": N, "search": 0, "total": N}
    json.dumps(res.as_json())

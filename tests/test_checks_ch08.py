"""The chapter 08 checks accept correct solutions and name the mistake in wrong ones."""

from __future__ import annotations

import math

import pytest
import torch

from boltzlab.grading.checks_ch08 import check_best_of_n, check_soft_optimal_weights
from boltzlab.grading.feedback import CheckFailed, ExerciseNotAttempted

# ----------------------------------------------------------------------------------------
# soft-optimal weights
# ----------------------------------------------------------------------------------------


def weights_softmax(rewards, alpha):
    z = rewards / alpha
    return torch.softmax(z, 1), alpha * (torch.logsumexp(z, 1) - math.log(z.shape[1]))


def weights_manual_shift(rewards, alpha):
    z = rewards / alpha
    m = z.max(1, keepdim=True).values
    e = (z - m).exp()
    return e / e.sum(1, keepdim=True), alpha * (m[:, 0] + e.mean(1).log())


def alpha_multiplies(rewards, alpha):
    z = rewards * alpha
    return torch.softmax(z, 1), (torch.logsumexp(z, 1) - math.log(z.shape[1])) / alpha


def value_without_alpha(rewards, alpha):
    w, v = weights_softmax(rewards, alpha)
    return w, v / alpha


def value_of_sum(rewards, alpha):
    return torch.softmax(rewards / alpha, 1), alpha * torch.logsumexp(rewards / alpha, 1)


def value_is_mean_reward(rewards, alpha):
    return torch.softmax(rewards / alpha, 1), rewards.mean(1)


def value_is_tilted_mean(rewards, alpha):
    w = torch.softmax(rewards / alpha, 1)
    return w, (w * rewards).sum(1)


def softmax_over_batch(rewards, alpha):
    return torch.softmax(rewards / alpha, 0), weights_softmax(rewards, alpha)[1]


def naive_exp(rewards, alpha):
    e = torch.exp(rewards / alpha)
    return e / e.sum(1, keepdim=True), alpha * torch.log(e.mean(1))


def returns_weights_only(rewards, alpha):
    return torch.softmax(rewards / alpha, 1)


@pytest.mark.parametrize("fn", [weights_softmax, weights_manual_shift])
def test_correct_weights_pass(fn, capsys):
    check_soft_optimal_weights(fn)
    assert "All checks passed for soft_optimal_weights" in capsys.readouterr().out


@pytest.mark.parametrize("fn, match", [
    (alpha_multiplies, "divided by alpha, not multiplied"),
    (value_without_alpha, "multiply the log-mean-exp by alpha"),
    (value_of_sum, "log of a SUM"),
    (value_is_mean_reward, "plain mean reward"),
    (value_is_tilted_mean, "mean reward under the tilted weights"),
    (softmax_over_batch, "not over the batch"),
    (naive_exp, "NaN or inf.*subtract the largest"),
    (returns_weights_only, "should return a tuple"),
])
def test_weight_mistakes_are_named(fn, match):
    with pytest.raises(CheckFailed, match=match):
        check_soft_optimal_weights(fn)


# ----------------------------------------------------------------------------------------
# best-of-N
# ----------------------------------------------------------------------------------------


def bon_correct(sample, reward, n, batch):
    x = sample(n * batch)
    r = reward(x).reshape(batch, n)
    return x.reshape(batch, n, -1)[torch.arange(batch), r.argmax(1)]


def bon_other_grouping(sample, reward, n, batch):
    x = sample(n * batch)  # groups of stride batch instead of consecutive rows: just as valid
    r = reward(x).reshape(n, batch)
    return x.reshape(n, batch, -1)[r.argmax(0), torch.arange(batch)]


def bon_loop(sample, reward, n, batch):
    out = []
    for _ in range(batch):
        x = sample(n)
        out.append(x[reward(x).argmax()])
    return torch.stack(out)


def bon_min(sample, reward, n, batch):
    x = sample(n * batch)
    r = reward(x).reshape(batch, n)
    return x.reshape(batch, n, -1)[torch.arange(batch), r.argmin(1)]


def bon_top_of_pool(sample, reward, n, batch):
    x = sample(n * batch)
    return x[reward(x).topk(batch).indices]


def bon_too_few(sample, reward, n, batch):
    x = sample((n - 1) * batch)
    r = reward(x).reshape(batch, n - 1) if n > 1 else reward(x).reshape(batch, 1)
    return x.reshape(batch, -1, x.shape[1])[torch.arange(batch), r.argmax(1)]


def bon_mixed_coordinates(sample, reward, n, batch):
    x = sample(n * batch).reshape(batch, n, -1)
    best = reward(x.reshape(n * batch, -1)).reshape(batch, n).argmax(1)
    out = x[torch.arange(batch), best].clone()
    if out.shape[1] > 1:
        out[:, 1] = x[:, 0, 1]  # second coordinate from the first candidate
    return out


def bon_no_selection(sample, reward, n, batch):
    sample((n - 1) * batch)  # draws the right number but keeps the first candidate of each group
    return sample(batch)


@pytest.mark.parametrize("fn", [bon_correct, bon_other_grouping, bon_loop])
def test_correct_best_of_n_passes(fn, capsys):
    check_best_of_n(fn)
    assert "All checks passed for best_of_n" in capsys.readouterr().out


@pytest.mark.parametrize("fn, match", [
    (bon_min, "LOWEST reward"),
    (bon_top_of_pool, "best `batch` samples of the whole pool"),
    (bon_too_few, "drew 80000 samples"),
    (bon_mixed_coordinates, "different candidates"),
    (bon_no_selection, "like single samples"),
])
def test_best_of_n_mistakes_are_named(fn, match):
    with pytest.raises(CheckFailed, match=match):
        check_best_of_n(fn)


def test_untouched_and_crashing():
    def untouched(*args):
        raise NotImplementedError()

    with pytest.raises(ExerciseNotAttempted):
        check_soft_optimal_weights(untouched)
    with pytest.raises(ExerciseNotAttempted):
        check_best_of_n(untouched)

    def crashes(sample, reward, n, batch):
        return sample(n * batch).reshape(batch, n)  # a shape error for dim 1 is fine; the argmax is missing

    with pytest.raises(CheckFailed, match="shape"):
        check_best_of_n(crashes)

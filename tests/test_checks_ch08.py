"""The chapter 08 checks accept correct solutions and name the mistake in wrong ones."""

from __future__ import annotations

import math

import pytest
import torch

from boltzlab.grading.checks_ch08 import (
    check_best_of_n,
    check_mixture_rollin,
    check_policy_gradient_loss,
    check_soft_optimal_weights,
)
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


# ----------------------------------------------------------------------------------------
# policy-gradient loss
# ----------------------------------------------------------------------------------------


def _loo(r):
    return r - (r.sum() - r) / (r.shape[0] - 1)


def pg_correct(log_probs, rewards, kl, alpha):
    r = rewards.detach()
    return -(_loo(r) * log_probs - alpha * kl).mean()


def pg_loop(log_probs, rewards, kl, alpha):
    b = rewards.shape[0]
    terms = []
    for i in range(b):
        others = torch.cat([rewards[:i], rewards[i + 1:]]).detach()
        terms.append((rewards[i].detach() - others.mean()) * log_probs[i] - alpha * kl[i])
    return -torch.stack(terms).sum() / b


def pg_no_baseline(log_probs, rewards, kl, alpha):
    return -(rewards.detach() * log_probs - alpha * kl).mean()


def pg_mean_with_self(log_probs, rewards, kl, alpha):
    r = rewards.detach()
    return -((r - r.mean()) * log_probs - alpha * kl).mean()


def pg_kl_sign(log_probs, rewards, kl, alpha):
    return -(_loo(rewards.detach()) * log_probs + alpha * kl).mean()


def pg_no_kl(log_probs, rewards, kl, alpha):
    return -(_loo(rewards.detach()) * log_probs).mean()


def pg_ascent(log_probs, rewards, kl, alpha):
    return (_loo(rewards.detach()) * log_probs - alpha * kl).mean()


def pg_sum(log_probs, rewards, kl, alpha):
    return -(_loo(rewards.detach()) * log_probs - alpha * kl).sum()


def pg_not_detached(log_probs, rewards, kl, alpha):
    return -(_loo(rewards) * log_probs - alpha * kl).mean()


def pg_per_sample(log_probs, rewards, kl, alpha):
    return -(_loo(rewards.detach()) * log_probs - alpha * kl)


def pg_item(log_probs, rewards, kl, alpha):
    return pg_correct(log_probs, rewards, kl, alpha).detach()


def pg_uses_package(log_probs, rewards, kl, alpha):
    import boltzlab.finetune as ft

    ft.policy_gradient_surrogate(None, None, None, None, None, None, rewards, alpha)
    return pg_correct(log_probs, rewards, kl, alpha)


@pytest.mark.parametrize("fn", [pg_correct, pg_loop])
def test_correct_policy_gradient_loss_passes(fn, capsys):
    check_policy_gradient_loss(fn)
    out = capsys.readouterr().out
    assert "All checks passed for policy_gradient_loss" in out and "exact Gaussian gradient" in out


@pytest.mark.parametrize("fn, match", [
    (pg_no_baseline, "no baseline"),
    (pg_mean_with_self, "including the sample itself"),
    (pg_kl_sign, "KL term has the wrong sign"),
    (pg_no_kl, "KL penalty is missing"),
    (pg_ascent, "wrong way"),
    (pg_sum, "B times too large"),
    (pg_not_detached, "rewards.detach"),
    (pg_per_sample, "should return a scalar tensor"),
    (pg_item, "does not depend on theta"),
    (pg_uses_package, "does not count"),
])
def test_policy_gradient_mistakes_are_named(fn, match):
    with pytest.raises(CheckFailed, match=match):
        check_policy_gradient_loss(fn)


def test_policy_gradient_biased_baseline_fails_the_exact_gradient():
    """A baseline built from the sample's own reward that the mistake list does not know is still caught:
    it passes no fixed batch and is biased against the exact Gaussian gradient."""

    def own_reward_baseline(log_probs, rewards, kl, alpha):
        r = rewards.detach()
        return -((r - 0.5 * r.max()) * log_probs - alpha * kl).mean()

    with pytest.raises(CheckFailed, match="gradient of your loss on a batch of 6"):
        check_policy_gradient_loss(own_reward_baseline)


# ----------------------------------------------------------------------------------------
# mixture roll-in
# ----------------------------------------------------------------------------------------


def mix_correct(rollin, student, pretrained, n, student_fraction):
    k = math.ceil(student_fraction * n)
    parts = [(rollin(m, c), flag) for m, c, flag in ((student, k, True), (pretrained, n - k, False)) if c > 0]
    x = torch.cat([p[0][0] for p in parts])
    t = torch.cat([p[0][1] for p in parts])
    flags = torch.cat([torch.full((p[0][1].shape[0],), p[1]) for p in parts])
    return x, t, flags


def mix_pretrained_first(rollin, student, pretrained, n, student_fraction):
    k = math.ceil(student_fraction * n)
    xs, ts, fs = [], [], []
    if n - k:
        x, t = rollin(pretrained, n - k)
        xs, ts, fs = [x], [t], [torch.zeros(n - k, dtype=torch.bool)]
    if k:
        x, t = rollin(student, k)
        xs, ts, fs = xs + [x], ts + [t], fs + [torch.ones(k, dtype=torch.bool)]
    return torch.cat(xs), torch.cat(ts), torch.cat(fs)


def mix_round(rollin, student, pretrained, n, student_fraction):
    k = round(student_fraction * n)
    parts = [(rollin(m, c), flag) for m, c, flag in ((student, k, True), (pretrained, n - k, False)) if c > 0]
    return (torch.cat([p[0][0] for p in parts]), torch.cat([p[0][1] for p in parts]),
            torch.cat([torch.full((p[0][1].shape[0],), p[1]) for p in parts]))


def mix_swapped_fraction(rollin, student, pretrained, n, student_fraction):
    x, t, f = mix_correct(rollin, pretrained, student, n, student_fraction)
    return x, t, ~f


def mix_inverted_labels(rollin, student, pretrained, n, student_fraction):
    x, t, f = mix_correct(rollin, student, pretrained, n, student_fraction)
    return x, t, ~f


_BERNOULLI = torch.Generator().manual_seed(0)  # seeded: the test must not depend on luck


def mix_bernoulli(rollin, student, pretrained, n, student_fraction):
    choose = torch.rand(n, generator=_BERNOULLI) < student_fraction
    k = int(choose.sum())
    return mix_correct(rollin, student, pretrained, n, k / n)


def mix_wasteful(rollin, student, pretrained, n, student_fraction):
    k = math.ceil(student_fraction * n)
    xs, ts = rollin(student, n)
    xp, tp = rollin(pretrained, n)
    return (torch.cat([xs[:k], xp[: n - k]]), torch.cat([ts[:k], tp[: n - k]]),
            torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(n - k, dtype=torch.bool)]))


def mix_calls_zero(rollin, student, pretrained, n, student_fraction):
    k = math.ceil(student_fraction * n)
    xs, ts = rollin(student, k)
    xp, tp = rollin(pretrained, n - k)
    return torch.cat([xs, xp]), torch.cat([ts, tp]), torch.cat([torch.ones(k, dtype=torch.bool),
                                                               torch.zeros(n - k, dtype=torch.bool)])


def mix_shuffled_times(rollin, student, pretrained, n, student_fraction):
    x, t, f = mix_correct(rollin, student, pretrained, n, student_fraction)
    return x, t.flip(0), f


def mix_float_labels(rollin, student, pretrained, n, student_fraction):
    x, t, f = mix_correct(rollin, student, pretrained, n, student_fraction)
    return x, t, f.float()


@pytest.mark.parametrize("fn", [mix_correct, mix_pretrained_first])
def test_correct_mixture_rollin_passes(fn, capsys):
    check_mixture_rollin(fn)
    assert "All checks passed for mixture_rollin" in capsys.readouterr().out


@pytest.mark.parametrize("fn, match", [
    (mix_round, "round\\(\\) and int\\(\\) give 2 here"),
    (mix_swapped_fraction, "fraction from the pretrained model"),
    (mix_inverted_labels, "inverted"),
    (mix_bernoulli, "changes from call to call|should make 2 states"),
    (mix_wasteful, "asked rollin for 16 states in all to return 8"),
    (mix_calls_zero, "asked for 0 states"),
    (mix_shuffled_times, "t do not belong to your x_t rows"),
    (mix_float_labels, "should be a bool tensor"),
])
def test_mixture_rollin_mistakes_are_named(fn, match):
    with pytest.raises(CheckFailed, match=match):
        check_mixture_rollin(fn)


def test_new_exercises_untouched():
    def untouched(*args):
        raise NotImplementedError()

    with pytest.raises(ExerciseNotAttempted):
        check_policy_gradient_loss(untouched)
    with pytest.raises(ExerciseNotAttempted):
        check_mixture_rollin(untouched)

"""Budgets: BOLTZLAB_BUDGET selects sizes; unknown values are a clear error."""

import dataclasses

import pytest

from boltzlab import config


def test_default_is_laptop(monkeypatch):
    monkeypatch.delenv("BOLTZLAB_BUDGET", raising=False)
    assert config.budget() == "laptop"
    monkeypatch.setenv("BOLTZLAB_BUDGET", "  ")
    assert config.budget() == "laptop"


@pytest.mark.parametrize("name", ["smoke", "laptop", "full", "SMOKE", " full "])
def test_known_budgets(monkeypatch, name):
    monkeypatch.setenv("BOLTZLAB_BUDGET", name)
    assert config.budget() == name.strip().lower()


def test_unknown_budget_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv("BOLTZLAB_BUDGET", "huge")
    with pytest.raises(config.UnknownBudgetError) as err:
        config.budget()
    msg = str(err.value)
    assert "'huge'" in msg and all(b in msg for b in config.BUDGETS)


def test_sizes_grow_with_budget():
    """Every registered chapter has all three budgets, and no size shrinks from smoke to full."""
    for chapter, table in config._REGISTRY.items():
        assert set(table) == set(config.BUDGETS), chapter
        smoke, laptop, full = (table[b] for b in config.BUDGETS)
        for f in dataclasses.fields(smoke):
            a, b, c = (getattr(s, f.name) for s in (smoke, laptop, full))
            if isinstance(a, (int, float)) and not isinstance(a, bool):
                assert a <= b <= c, (chapter, f.name, a, b, c)


def test_sizes_follow_environment(monkeypatch):
    monkeypatch.setenv("BOLTZLAB_BUDGET", "smoke")
    assert config.sizes("00") == config._REGISTRY["00"]["smoke"]
    assert config.sizes("00", "full") == config._REGISTRY["00"]["full"]
    with pytest.raises(KeyError, match="no sizes for chapter"):
        config.sizes("99")


def test_torch_threads_are_set_in_one_place(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("BOLTZLAB_THREADS", raising=False)
        assert config.set_torch_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("BOLTZLAB_THREADS", "2")
        assert config.set_torch_threads() == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("BOLTZLAB_THREADS", "zero")
        with pytest.raises(ValueError, match="BOLTZLAB_THREADS must be a positive integer"):
            config.torch_threads()
    finally:
        torch.set_num_threads(before)


def test_every_chapter_sets_threads_through_config():
    """No chapter picks its own thread count; each calls config.set_torch_threads()."""
    from pathlib import Path

    chapters = sorted((Path(__file__).resolve().parents[1] / "chapters").glob("[0-9A]*.py"))
    assert chapters
    for path in chapters:
        text = path.read_text()
        assert "set_torch_threads()" in text, f"{path.name} does not call config.set_torch_threads()"
        assert "torch.set_num_threads(" not in text, f"{path.name} sets its own thread count"


def test_describe_prints_every_size_on_short_lines(monkeypatch):
    monkeypatch.setenv("BOLTZLAB_BUDGET", "laptop")
    text = config.describe(config.sizes("06"))
    lines = text.splitlines()
    assert lines[0] == "budget: laptop" and all(len(line) <= 100 for line in lines)
    for f in dataclasses.fields(config.Chapter06Sizes):
        assert f"{f.name}={getattr(config.sizes('06'), f.name)}" in text

"""Test-session settings shared by every test file."""

import torch

# Two pytest-xdist workers share two cores: one torch thread each avoids oversubscription,
# which on this class of machine slows small tensor operations by orders of magnitude.
torch.set_num_threads(1)


def pytest_terminal_summary(terminalreporter):
    """Name the learner's-tour artefacts (screenshots and measurements of tests/test_browser.py),
    so that a CI log says where to find them."""
    import os
    from pathlib import Path

    ran_tour = any("test_browser.py" in getattr(report, "nodeid", "")
                   for reports in terminalreporter.stats.values() for report in reports)
    if not ran_tour:
        return
    folder = Path(os.environ.get("BOLTZLAB_TOUR_DIR", Path(__file__).resolve().parents[1] / "artifacts" / "browser"))
    shots = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if shots:
        terminalreporter.section("learner's tour artefacts")
        for path in shots:
            terminalreporter.write_line(str(path))
        reports = sorted(folder.glob("*.json"))
        terminalreporter.write_line(f"measurements: {len(reports)} JSON reports in {folder}")

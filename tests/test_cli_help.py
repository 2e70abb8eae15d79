"""Every console script answers --help with a description and examples, without importing torch, Lightning or
Hydra (what made `zoo-finetune --help` take 12 s)."""
import subprocess
import sys

import pytest

CLIS = {"zoo-train": "tasks.cli.train", "zoo-eval": "tasks.cli.evaluate", "zoo-finetune": "tasks.cli.finetune",
        "zoo-export": "tasks.cli.export", "zoo-predict": "zoo.predict"}


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_help_is_light_and_has_examples(prog):
    script = (f"import sys\nsys.argv = [{prog!r}, '--help']\nfrom {CLIS[prog]} import main\n"
              "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
              "print('EXIT', code or 0, 'HEAVY', sorted(m for m in ('torch', 'lightning', 'hydra') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "EXIT 0 HEAVY []" in done.stdout
    assert prog in done.stdout and "examples:" in done.stdout
    assert f"{prog} " in done.stdout.split("examples:", 1)[1]  # at least one example command line


def test_hydra_help_lists_the_config_groups():
    from tasks.cli.help import config_groups

    groups = config_groups()
    assert {"experiment", "debug", "logger", "trainer"} <= set(groups)
    assert "quickstart" in groups["experiment"] and "fdr" in groups["debug"]

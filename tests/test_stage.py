import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def test_exit_process_keeps_the_exit_code_the_atexit_handlers_and_unflushed_output():
    script = textwrap.dedent(
        """
        import atexit, gc, sys
        sys.path.insert(0, sys.argv[1])
        from petpipe.stage import exit_process
        atexit.register(lambda: print("atexit ran, frozen:", gc.get_freeze_count() > 0, end=""))
        print("no newline yet", end=" ")
        print("stderr too", end="", file=sys.stderr)
        exit_process(3)
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(SRC)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout == "no newline yet atexit ran, frozen: True"
    assert done.stderr == "stderr too"

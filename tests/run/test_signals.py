"""A stop signal inside ``deferred_stop`` (the tracking code's store writes) waits for the block's end; a second one
does not."""

from __future__ import annotations

import os
import signal

import pytest

from petpipe.run.signals import deferred_stop, stop_on_signals


def test_a_stop_inside_a_store_write_is_raised_when_the_write_ends():
    done = []
    with stop_on_signals(), pytest.raises(KeyboardInterrupt, match="signal 15"):
        with deferred_stop():
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # the handler has run by now
            done.append("the write finished")
    assert done == ["the write finished"]


def test_a_second_stop_is_raised_at_once_even_inside_a_store_write():
    done = []
    with stop_on_signals(), pytest.raises(KeyboardInterrupt, match="signal 2"):
        with deferred_stop():
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))
            done.append("not reached")
    assert done == []


def test_nested_blocks_raise_once_the_outermost_ends():
    steps = []
    with stop_on_signals(), pytest.raises(KeyboardInterrupt):
        with deferred_stop():
            with deferred_stop():
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(1000))
            steps.append("after the inner block")
    assert steps == ["after the inner block"]

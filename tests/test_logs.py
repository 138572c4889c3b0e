"""fedmed logs under one logger, `fedmed`, and its records reach Flower's handlers where Flower
started the process (a deployed ServerApp or ClientApp) and nothing else configured logging."""

from __future__ import annotations

import io
import logging

from fedmed import logs


def test_fedmed_records_reach_flowers_handler_where_the_root_logger_has_none(monkeypatch):
    stream = io.StringIO()
    flower_handler = logging.StreamHandler(stream)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logging.getLogger("flwr"), "handlers", [flower_handler])
    monkeypatch.setattr(logs.log, "handlers", [])
    monkeypatch.setattr(logs.log, "propagate", True)
    monkeypatch.setattr(logs.log, "level", logging.NOTSET)

    logs.through_flower_handlers()
    logs.through_flower_handlers()  # once per message: the handler is added once
    logs.log.info("3 of 3 sites connected")

    assert stream.getvalue() == "3 of 3 sites connected\n"


def test_nothing_changes_where_logging_is_configured(monkeypatch):
    monkeypatch.setattr(logs.log, "handlers", [])
    assert logging.getLogger().handlers  # pytest's own
    logs.through_flower_handlers()
    assert logs.log.handlers == [] and logs.log.propagate


def test_no_module_logs_through_flowers_logger():
    from tests.conftest import REPO

    offenders = [
        str(path.relative_to(REPO))
        for folder in ("fedmed", "clients", "strategies")
        for path in (REPO / folder).rglob("*.py")
        if "from flwr.supercore import log" in path.read_text()
        or 'getLogger("flwr").info' in path.read_text()
        or 'getLogger("flwr").warning' in path.read_text()
    ]
    assert offenders == []


def test_flowers_notice_that_an_actor_ends_is_dropped_and_nothing_else(monkeypatch):
    import inspect

    from flwr.simulation.ray_transport.ray_actor import ClientAppActor

    assert logs.ACTOR_END_NOTICE in inspect.getsource(ClientAppActor.terminate), (
        "Flower's ClientAppActor.terminate logs something else now: update fedmed.logs.ACTOR_END_NOTICE"
    )
    flower = logging.getLogger("flwr")
    monkeypatch.setattr(flower, "filters", [])
    stream = io.StringIO()
    monkeypatch.setattr(flower, "handlers", [logging.StreamHandler(stream)])
    monkeypatch.setattr(flower, "propagate", False)
    logs.without_actor_end_notice()
    logs.without_actor_end_notice()
    assert len(flower.filters) == 1
    flower.warning("Manually terminating %s", "ClientAppActor")
    flower.warning("a client raised")
    assert stream.getvalue() == "a client raised\n"

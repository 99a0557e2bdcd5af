"""The output collector on scripted iopub message sequences (no kernel needed)."""

from __future__ import annotations

from typing import Any

from gateway.outputs import OutputCollector, resolve_control_chars, summarise


def msg(msg_type: str, **content: Any) -> dict[str, Any]:
    return {"header": {"msg_type": msg_type}, "parent_header": {"msg_id": "m"}, "content": content,
            "metadata": {}}


def test_resolve_control_chars_like_jupyter_front_ends() -> None:
    assert resolve_control_chars("10%\r50%\r100%\n") == "100%\n"
    assert resolve_control_chars("abc\b\bX") == "aX"
    assert resolve_control_chars("line\r\nnext") == "line\nnext"
    assert resolve_control_chars("long text\rshort") == "short"
    assert resolve_control_chars("plain") == "plain"


def test_streams_are_coalesced_per_name_and_events_flow_to_the_sink() -> None:
    events: list[dict[str, Any]] = []
    collector = OutputCollector(1000, events.append)
    for message in (msg("stream", name="stdout", text="a"), msg("stream", name="stdout", text="b\n"),
                    msg("stream", name="stderr", text="warn\n"), msg("stream", name="stdout", text="c\n")):
        collector.handle(message)
    outputs = collector.finish()
    assert [(o["name"], o["text"]) for o in outputs] == [("stdout", "ab\n"), ("stderr", "warn\n"), ("stdout", "c\n")]
    assert [e["type"] for e in events] == ["stdout", "stdout", "stderr", "stdout"]
    assert summarise(outputs)["stdout"] == "ab\nc\n"


def test_budget_cuts_streams_and_displays_but_keeps_results_and_errors() -> None:
    collector = OutputCollector(10, None)
    collector.handle(msg("stream", name="stdout", text="0123456789ABCDEF"))
    collector.handle(msg("display_data", data={"text/plain": "x" * 50}, metadata={}))
    collector.handle(msg("execute_result", data={"text/plain": "42"}, metadata={}, execution_count=3))
    collector.handle(msg("error", ename="ValueError", evalue="\x1b[31mbad\x1b[0m", traceback=["\x1b[31mTB\x1b[0m"]))
    outputs = collector.finish()
    assert collector.truncated is True
    assert outputs[0]["text"].startswith("0123456789\n[output truncated")
    assert [o["output_type"] for o in outputs] == ["stream", "execute_result", "error"]
    summary = summarise(outputs)
    assert summary["result"] == "42"
    assert summary["error"] == {"name": "ValueError", "value": "bad", "traceback": "TB"}


def test_clear_output_and_update_display() -> None:
    collector = OutputCollector(1000, None)
    collector.handle(msg("stream", name="stdout", text="old\n"))
    collector.handle(msg("clear_output", wait=True))
    collector.handle(msg("display_data", data={"text/plain": "v1"}, metadata={}, transient={"display_id": "d"}))
    collector.handle(msg("update_display_data", data={"text/plain": "v2"}, metadata={}, transient={"display_id": "d"}))
    outputs = collector.finish()
    assert outputs == [{"output_type": "display_data", "data": {"text/plain": "v2"}, "metadata": {}}]

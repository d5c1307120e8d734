"""The wire protocol, transport and runtime blocks are byte-identical in both scripts, and
self-contained."""

import difflib
import os

import pytest

from tests.conftest import ROOT

BLOCKS = ("MNEDC WIRE PROTOCOL", "MNEDC TRANSPORT", "MNEDC RUNTIME")


def block(script, name):
    """The lines between '# ==== BEGIN name ====' and '# ==== END name ====', banners included."""
    with open(os.path.join(ROOT, script)) as source:
        text = source.read()
    begin, end = "# ==== BEGIN %s ====" % name, "# ==== END %s ====" % name
    assert text.count(begin) == 1 and text.count(end) == 1, "%s: %r must appear exactly once" % (script, begin)
    return text[text.index(begin):text.index(end) + len(end)] + "\n"


@pytest.mark.parametrize("name", BLOCKS)
def test_block_is_identical_in_both_scripts(name):
    server, client = block("mnedc_server.py", name), block("mnedc_client.py", name)
    diff = "".join(difflib.unified_diff(server.splitlines(True), client.splitlines(True),
                                        "mnedc_server.py", "mnedc_client.py"))
    assert server == client, "the %s block differs:\n%s" % (name, diff)


def test_wire_block_runs_alone_in_an_empty_namespace():
    namespace = {"__name__": "wire_block_alone"}
    exec(compile(block("mnedc_server.py", "MNEDC WIRE PROTOCOL"), "wire-block", "exec"), namespace)
    frame = namespace["encode_frame"](namespace["FRAME_PING"], b"x")
    reader = namespace["FrameReader"]()
    reader.feed(frame)
    assert reader.take_frames() == [(namespace["FRAME_PING"], b"x")]


def test_runtime_block_needs_only_the_wire_block_and_stdlib():
    namespace = {"__name__": "runtime_block_alone"}
    exec(compile(block("mnedc_server.py", "MNEDC WIRE PROTOCOL"), "wire-block", "exec"), namespace)
    header = ("import errno, fcntl, heapq, json, os, select, selectors, shutil, signal, socket, subprocess, sys, "
              "syslog, time, traceback\n")
    exec(compile(header + block("mnedc_server.py", "MNEDC RUNTIME"), "runtime-block", "exec"), namespace)
    assert namespace["parse_host_port"]("example:99", 1) == ("example", 99)


def test_transport_block_needs_only_the_wire_block_and_stdlib():
    namespace = {"__name__": "transport_block_alone"}
    exec(compile(block("mnedc_server.py", "MNEDC WIRE PROTOCOL"), "wire-block", "exec"), namespace)
    exec(compile(block("mnedc_server.py", "MNEDC TRANSPORT"), "transport-block", "exec"), namespace)
    batcher = namespace["Batcher"]()
    batcher.begin()
    batcher.flush()
    assert not batcher.active and namespace["FrameTransport"].BATCHED == ()

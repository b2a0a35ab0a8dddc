#!/usr/bin/env python3
"""Pathological mails: time and peak memory of parsing each one, in a fresh process each.

    python bench/pathological.py                          # every case, 300 s each at most
    python bench/pathological.py --timeout 120            # give up on a case sooner
    python bench/pathological.py --cases plain-25mb 'run-lt-*'   # a subset (names or shell patterns)
    python bench/pathological.py --list                   # the case names, with what each mail is
    python bench/pathological.py --json                   # one JSON object instead of the table

What is measured, per case, in a child process of its own (so its peak memory is that case's alone):
- parse:    `pipeline.parsers.mime.parse_mail(raw)`;
- sanitize: for a mail with an HTML body, `parsed.body_html_sanitized` (what the write stage
            stores: `sanitize_html(parsed.body_html)`).
Columns: the raw mail's size; wall and CPU seconds of parse + sanitize; the child's peak RSS
(ru_maxrss from wait4, the whole process: interpreter, imports, the mail, the parse) and how much
of it came after the imports (the mail's bytes included); the slowest stage, and within parse the
slowest step of `parse_mail` (its helpers, timed by wrapping them where they exist in
`pipeline.parsers.mime`). A case still running after `--timeout` seconds is killed and shows
"> N s (killed)", with the pipeline frame it was in (a faulthandler dump just before the kill).
A child is also refused memory past `--memory-limit` (address space), to spare a shared machine.

The code measured is the `pipeline` package found from the current directory, as the interpreter
finds it: `cd /work/baseline && .venv/bin/python /work/main/bench/pathological.py` measures the
baseline tree with this script. The mails are built here, deterministically (sizes in KiB/MiB).
It is a script, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import os
import sys

# Import `pipeline` from the tree we are run in, not from beside this file: sys.path[0] is this
# script's folder, whose bench/pipeline.py would shadow the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
if os.path.abspath(os.getcwd()) != _HERE:
    sys.path.insert(0, os.getcwd())

import argparse
import fnmatch
import json
import random
import resource
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

KIB, MIB = 1024, 1024 * 1024
CRLF = "\r\n"

# -- the mails --------------------------------------------------------------------------------------

_WORDS = ("the printer on the third floor is offline again and nobody can scan invoices since this "  # noqa: SIM905
          "morning please could someone look at it before the audit tomorrow we restarted it twice "
          "error code appears on the display after login users report timeouts mailbox full vpn "
          "password reset ticket laptop screen flickers outlook keeps asking credentials thanks regards "
          "urgent server backup failed disk warning license renewal contract invoice meeting").split()


def _headers(name: str, content_type: str, subject: str = "Printer offline", extra: list[str] | None = None) -> str:
    lines = [
        "From: Pat Sender <pat@contoso.example>",
        "To: Support <support@acme-helpdesk.example>",
        f"Subject: {subject}",
        "Date: Mon, 07 Dec 2026 09:00:00 +0000",
        f"Message-ID: <pathological-{name}@contoso.example>",
        *(extra or []),
        "MIME-Version: 1.0",
        f"Content-Type: {content_type}; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    return CRLF.join(lines) + CRLF + CRLF


def _words_text(rng: random.Random, size: int, width: int = 72) -> str:
    """Paragraphs of words in lines of about `width` characters, `size` characters in all (or a little less)."""
    out: list[str] = []
    total = 0
    line: list[str] = []
    line_len = 0
    while total < size:
        w = rng.choice(_WORDS)
        if line_len + len(w) + 1 > width:
            text = " ".join(line) + CRLF
            if rng.random() < 0.12:
                text += CRLF  # a paragraph break
            out.append(text)
            total += len(text)
            line, line_len = [], 0
        line.append(w)
        line_len += len(w) + 1
    return "".join(out)[:size]


def _plain(name: str, size: int) -> bytes:
    head = _headers(name, "text/plain")
    body = _words_text(random.Random(27), size - len(head) - 2)
    return (head + body + CRLF).encode()


def _soup(name: str, size: int) -> bytes:
    """Unclosed <b>, <p>, <div>, <span>, <td> at random among words, never closed."""
    rng = random.Random(27)
    head = _headers(name, "text/html")
    tags = ("<b>", "<p>", "<div>", "<span>", "<td>")
    out = ["<html><body>"]
    total = len(head) + len(out[0])
    line_len = 0
    while total < size:
        tok = rng.choice(tags) if rng.random() < 0.35 else rng.choice(_WORDS) + " "
        if line_len + len(tok) > 76:
            tok = CRLF + tok
            line_len = 0
        out.append(tok)
        line_len += len(tok)
        total += len(tok)
    return (head + "".join(out) + CRLF).encode()


def _nested_divs(name: str, depth: int, closed: bool) -> bytes:
    """`depth` nested <div>, a word at the bottom; closed or not. A line break every 100 tags."""
    head = _headers(name, "text/html")

    def lines(tag: str, n: int) -> str:
        full, rest = divmod(n, 100)
        return (tag * 100 + CRLF) * full + tag * rest

    body = "<html><body>" + CRLF + lines("<div>", depth) + "printer" + (lines("</div>", depth) if closed else "")
    return (head + body + CRLF).encode()


def _run(name: str, char: str, size: int, html: bool) -> bytes:
    """`size` characters of `char` in one line, the last thing in the body."""
    run = char * size
    if html:
        body = "<html><body><p>Hello,</p>" + CRLF + "<p>" + run + CRLF
    else:
        body = "Hello," + CRLF + CRLF + run + CRLF
    return (_headers(name, "text/html" if html else "text/plain") + body).encode()


def _long_subject(name: str, size: int, folded: bool) -> bytes:
    rng = random.Random(27)
    words: list[str] = []
    total = 0
    while total < size:
        w = rng.choice(_WORDS)
        words.append(w)
        total += len(w) + 1
    if folded:  # folded as a mail client would: lines of about 76 characters
        lines: list[str] = []
        line = ""
        for w in words:
            if line and len(line) + len(w) + 1 > 76:
                lines.append(line)
                line = ""
            line = f"{line} {w}" if line else w
        lines.append(line)
        subject = (CRLF + " ").join(lines)
    else:
        subject = " ".join(words)
    return (_headers(name, "text/plain", subject=subject) + "Hello," + CRLF + CRLF + "see subject." + CRLF).encode()


def _many_headers(name: str, count: int) -> bytes:
    extra = []
    for i in range(count):
        if i % 2:
            extra.append(f"X-Trace-{i:05d}: hop={i} id=a{i * 7919 % 100003:06x} ok")
        else:
            extra.append(f"Received: from relay{i}.contoso.example (relay{i}.contoso.example [10.0.{i // 256 % 256}."
                         f"{i % 256}]) by mx.acme-helpdesk.example with ESMTP id R{i:05d};"
                         f" Mon, 07 Dec 2026 08:{i // 60 % 60:02d}:{i % 60:02d} +0000")
    return (_headers(name, "text/plain", extra=extra) + "Hello," + CRLF + CRLF + "the printer is offline." + CRLF).encode()


_RUN_CHARS = {"lt": "<", "amp": "&", "eq": "=", "dquote": '"', "squote": "'", "space": " "}


def _cases() -> dict[str, tuple[str, Callable[[], bytes]]]:
    """name -> (what it is, builder)."""
    cases: dict[str, tuple[str, Callable[[], bytes]]] = {
        "plain-25mb": ("25 MiB plain-text mail (words, 72-character lines)", lambda: _plain("plain-25mb", 25 * MIB)),
        "html-soup-5mb": ("5 MiB HTML tag soup: <b> <p> <div> <span> <td> among words, never closed",
                          lambda: _soup("html-soup-5mb", 5 * MIB)),
        "div-40k": ("40,000 nested <div>, a word inside, closed", lambda: _nested_divs("div-40k", 40_000, True)),
        "div-10mb": ("10 MiB of nested <div> (2,097,152 of them), a word inside, never closed",
                     lambda: _nested_divs("div-10mb", 10 * MIB // len("<div>"), False)),
    }
    for key, char in _RUN_CHARS.items():
        for kib in (100, 200):
            for kind in ("html", "text"):
                name = f"run-{key}-{kib}k-{kind}"
                cases[name] = (f"{kib} KiB of {char!r} in one line, the end of a {kind.upper()} body",
                               lambda name=name, char=char, kib=kib, kind=kind: _run(name, char, kib * KIB, kind == "html"))
    cases["subject-1mb"] = ("1 MiB Subject, folded in 76-character lines",
                            lambda: _long_subject("subject-1mb", MIB, folded=True))
    cases["subject-1mb-oneline"] = ("1 MiB Subject in one line", lambda: _long_subject("subject-1mb-oneline", MIB, folded=False))
    cases["headers-10k"] = ("10,000 header lines (Received: and X-Trace-N:, alternately)",
                            lambda: _many_headers("headers-10k", 10_000))
    return cases


# -- the child: one case, measured ------------------------------------------------------------------

# parse_mail's helpers timed in the child, where they exist in pipeline.parsers.mime (top level of parse_mail
# first; html_to_text runs inside _choose_body).
_STEPS = ("_message", "_Walk.run", "_choose_body", "new_text", "forwarded_origin", "bounce_info",
          "auto_reply_reason", "decode_header_value")
_NESTED = {"html_to_text": "_choose_body"}


def _emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _wrap_steps(mime) -> dict[str, float]:
    spent: dict[str, float] = {}

    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    for name in (*_STEPS, *_NESTED):
        owner, _, attr = name.rpartition(".")
        target = getattr(mime, owner, None) if owner else mime
        fn = getattr(target, attr, None) if target is not None else None
        if callable(fn):
            setattr(target, attr, timed(name, fn))
    return spent


def child(path: str, memory_limit_mib: int) -> None:
    import faulthandler

    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=False)
    if memory_limit_mib:
        limit = memory_limit_mib * MIB
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import pipeline
    from pipeline.parsers import mime

    spent = _wrap_steps(mime)
    _emit("ready", base_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, cpu=time.process_time(),
          pipeline=os.path.dirname(os.path.abspath(pipeline.__file__)))
    raw = Path(path).read_bytes()
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        parsed = mime.parse_mail(raw)
    except Exception as exc:  # noqa: BLE001 - Unparseable, or worse: reported, not raised
        _emit("stage", stage="parse", wall=time.perf_counter() - w0, cpu=time.process_time() - c0, steps=spent,
              error=f"{type(exc).__name__}: {exc}"[:300])
        _emit("done", peak_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return
    _emit("stage", stage="parse", wall=time.perf_counter() - w0, cpu=time.process_time() - c0, steps=dict(spent))
    info = {"body_text_chars": len(parsed.body_text), "body_new_chars": len(parsed.body_new),
            "body_html_chars": None if parsed.body_html is None else len(parsed.body_html),
            "subject_chars": len(parsed.subject), "headers": len(parsed.headers),
            "warnings": list(parsed.warnings)[:10]}
    if parsed.body_html is not None:
        w0, c0 = time.perf_counter(), time.process_time()
        if hasattr(type(parsed), "body_html_sanitized"):  # as the write stage takes it
            clean = parsed.body_html_sanitized
        else:
            from pipeline.parsers.sanitize import sanitize_html
            clean = sanitize_html(parsed.body_html)
        _emit("stage", stage="sanitize", wall=time.perf_counter() - w0, cpu=time.process_time() - c0)
        info["sanitized_chars"] = None if clean is None else len(clean)
    _emit("done", peak_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, **info)


# -- the parent: a child per case, a row per case ---------------------------------------------------

def _reader(stream, sink: list, stamps: list | None) -> None:
    for line in iter(stream.readline, b""):
        sink.append(line)
        if stamps is not None:
            stamps.append(time.perf_counter())
    stream.close()


def run_case(name: str, timeout: float, memory_limit: int, workdir: Path) -> dict:
    # The mail is built in a process of its own: a child's ru_maxrss starts at its parent's RSS (fork
    # copies it), so this process stays small and never holds a mail.
    path = workdir / f"{name}.eml"
    subprocess.run([sys.executable, os.path.abspath(__file__), "--build", name, str(path)], check=True)
    size = path.stat().st_size
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", str(path),
                             "--memory-limit", str(memory_limit)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=os.getcwd())
    out: list[bytes] = []
    stamps: list[float] = []
    err: list[bytes] = []
    readers = [threading.Thread(target=_reader, args=(proc.stdout, out, stamps), daemon=True),
               threading.Thread(target=_reader, args=(proc.stderr, err, None), daemon=True)]
    for t in readers:
        t.start()
    started = time.perf_counter()
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        now = time.perf_counter()
        ready_at = stamps[0] if stamps else None
        # The timeout counts from the start of the parse (after the child's imports); a child that never
        # gets there gets the same time in all.
        if now - (ready_at if ready_at is not None else started) > timeout:
            ended = now
            os.kill(proc.pid, signal.SIGUSR1)  # faulthandler: where it is, on stderr
            time.sleep(0.5)
            os.kill(proc.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(proc.pid, 0)
            killed = True
            break
        time.sleep(0.05)
    if not killed:
        ended = time.perf_counter()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join(5)
    path.unlink()

    events = []
    for line in out:
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    ready = next((e for e in events if e["event"] == "ready"), None)
    done = next((e for e in events if e["event"] == "done"), None)
    stages = {e["stage"]: e for e in events if e["event"] == "stage"}
    stderr = b"".join(err).decode("utf-8", "replace")
    row: dict = {"case": name, "bytes": size, "killed": killed, "exit": proc.returncode,
                 "peak_rss_mib": usage.ru_maxrss / KIB,
                 "child_cpu_s": usage.ru_utime + usage.ru_stime}
    if ready:
        row["pipeline"] = ready["pipeline"]
        row["over_imports_mib"] = (usage.ru_maxrss - ready["base_kib"]) / KIB
        ready_at = stamps[0]
        if done or killed:
            # From the parse's start: the whole parse + sanitize, or until the kill.
            row["wall_s"] = (sum(s["wall"] for s in stages.values()) if done else ended - ready_at)
            row["cpu_s"] = (sum(s["cpu"] for s in stages.values()) if done
                            else usage.ru_utime + usage.ru_stime - ready["cpu"])
    row["stages"] = {k: {"wall_s": v["wall"], "cpu_s": v["cpu"]} for k, v in stages.items()}
    parse = stages.get("parse")
    if parse:
        row["parse_steps_s"] = parse.get("steps", {})
        if parse.get("error"):
            row["error"] = parse["error"]
    if done:
        row.update({k: v for k, v in done.items() if k not in ("event", "peak_kib")})
    if killed:
        row["running"] = "sanitize" if "parse" in stages else "parse"
        row["killed_in"] = _frames(stderr)
    elif not done:
        row["died"] = _death(proc.returncode, stderr)
    return row


def _frames(dump: str) -> list[str]:
    """The pipeline frames of a faulthandler dump, innermost first, as "parsers/reply.py:88 new_text"."""
    frames = []
    for line in dump.splitlines():
        line = line.strip()
        if line.startswith('File "') and "/pipeline/" in line:
            path, _, rest = line[6:].partition('", line ')
            lineno, _, func = rest.partition(" in ")
            frames.append(f"{path.rsplit('/pipeline/', 1)[1]}:{lineno} {func}")
    return frames


def _death(code: int, stderr: str) -> str:
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
    tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:]
    return how + (f": {tail[0].strip()[:160]}" if tail else "")


def _slowest(row: dict) -> str:
    """'sanitize', or 'parse' with its slowest step; for a killed case, where it was."""
    if row.get("killed"):
        where = row.get("killed_in") or []
        parse = row.get("stages", {}).get("parse")
        done = f"; parse took {parse['wall_s']:.2f} s" if parse else ""
        return f"{row['running']} (killed in {where[0]}{done})" if where else f"{row['running']} (killed{done})"
    stages = row.get("stages", {})
    if not stages:
        return "—"
    stage = max(stages, key=lambda k: stages[k]["wall_s"])
    if stage != "parse":
        return f"{stage} ({stages['parse']['wall_s']:.2f} s parse)" if "parse" in stages else stage
    steps = row.get("parse_steps_s", {})
    top = {k: v for k, v in steps.items() if k not in _NESTED}
    if not top:
        return "parse"
    step = max(top, key=top.get)
    for inner, outer in _NESTED.items():
        if step == outer and steps.get(inner, 0.0) >= 0.5 * top[step]:
            step = f"{outer} > {inner}"
    share = top[max(top, key=top.get)] / stages["parse"]["wall_s"] if stages["parse"]["wall_s"] else 0.0
    return f"parse: {step} {share:.0%}"


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / KIB:.0f} KiB"


def _seconds(row: dict, key: str, timeout: float) -> str:
    if row.get("killed"):
        return f"> {timeout:g} s (killed)" if key == "wall_s" else f"{row.get(key, 0):.1f}"
    value = row.get(key)
    return "—" if value is None else f"{value:.2f}"


_COLUMNS = f"{'case':<22} {'size':>9} {'wall s':>20} {'CPU s':>7} {'peak MiB':>9} {'+MiB':>8}  slowest"


def _line(row: dict, timeout: float) -> str:
    over = row.get("over_imports_mib")
    line = (f"{row['case']:<22} {_size(row['bytes']):>9} {_seconds(row, 'wall_s', timeout):>20} "
            f"{_seconds(row, 'cpu_s', timeout):>7} {row['peak_rss_mib']:>9.1f} "
            f"{'—' if over is None else f'{over:.1f}':>8}  {_slowest(row)}")
    notes = []
    if row.get("died"):
        notes.append(f"died: {row['died']}")
    if row.get("error"):
        notes.append(f"raised {row['error']}")
    if row.get("warnings"):
        notes.append("warnings: " + "; ".join(row["warnings"])[:150])
    return line + "".join(f"\n{'':<22}   {n}" for n in notes)


def _tree(pipeline_dir: str | None) -> dict:
    if not pipeline_dir:
        return {}
    root = os.path.dirname(pipeline_dir)
    git = ["git", "-C", root]
    rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "pipeline"], capture_output=True, text=True, check=False).stdout
    branch = subprocess.run([*git, "rev-parse", "--abbrev-ref", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    return {"pipeline": pipeline_dir, "rev": rev or None, "branch": branch or None,
            "uncommitted_changes_in_pipeline": bool(dirty.strip())}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        ap = argparse.ArgumentParser()
        ap.add_argument("--child")
        ap.add_argument("--memory-limit", type=int, default=0)
        args = ap.parse_args()
        child(args.child, args.memory_limit)
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--build":
        Path(sys.argv[3]).write_bytes(_cases()[sys.argv[2]][1]())
        return

    cases = _cases()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", metavar="NAME",
                    help="run only these cases (names or shell patterns, e.g. 'run-lt-*'); see --list")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds a case may take (parse + sanitize) before it is killed (default 300)")
    ap.add_argument("--memory-limit", type=int, default=8192, metavar="MIB",
                    help="address space a child may have, MiB; 0: no limit (default 8192)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object instead of a table")
    args = ap.parse_args()

    if args.list:
        for name, (what, _) in cases.items():
            print(f"{name:<22} {what}")
        return
    chosen = list(cases)
    if args.cases:
        unknown = [p for p in args.cases if not fnmatch.filter(cases, p)]
        if unknown:
            ap.error(f"no case matches {', '.join(unknown)} (see --list)")
        chosen = [n for n in cases if any(fnmatch.fnmatchcase(n, p) for p in args.cases)]

    import importlib.util
    spec = importlib.util.find_spec("pipeline")
    tree = _tree(os.path.dirname(spec.origin) if spec and spec.origin else None)
    header = {"python": sys.executable, **tree, "timeout_s": args.timeout, "memory_limit_mib": args.memory_limit}
    if not args.json:
        state = " + uncommitted changes in pipeline/" if tree.get("uncommitted_changes_in_pipeline") else ""
        print(f"pipeline: {tree.get('pipeline')} (git {tree.get('rev')} on {tree.get('branch')}{state})")
        print(f"python:   {sys.executable}")
        print(f"each case in a fresh process; timeout {args.timeout:g} s; memory limit "
              f"{args.memory_limit or 'none'} MiB. wall/CPU: parse + sanitize. peak MiB: the child's peak RSS; "
              f"+MiB: of it after the imports (the mail's bytes included)")
        print()
        print(_COLUMNS)
        sys.stdout.flush()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mailloop-pathological-") as tmp:
        for name in chosen:
            row = run_case(name, args.timeout, args.memory_limit, Path(tmp))
            if row.get("pipeline") and tree.get("pipeline") and row["pipeline"] != tree["pipeline"]:
                print(f"warning: the child imported {row['pipeline']}, not {tree['pipeline']}", file=sys.stderr)
            rows.append(row)
            if args.json:
                print(f"{name}: done", file=sys.stderr)
            else:
                print(_line(row, args.timeout))
                sys.stdout.flush()
    if args.json:
        for row in rows:
            row["slowest"] = _slowest(row)
        print(json.dumps({**header, "cases": rows}))


if __name__ == "__main__":
    main()

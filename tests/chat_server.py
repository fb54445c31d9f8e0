"""A small OpenAI-compatible chat-completions server on 127.0.0.1 for tests.

It speaks the real protocol over real HTTP (POST /v1/chat/completions, JSON in and out); its
"model" is the arithmetic oracle, playing whichever refinement role the system prompt asks for.
Failure injection: `fail_next` answers that many requests with HTTP 500, `stall_next` sleeps past
the client's timeout on that many, `always_fail` answers every request with 500.
Every request it receives is recorded in `requests` (role and user text).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from data_recipes import generators as g
from data_recipes.oracles import ArithmeticOracle
from data_recipes.generators import GeneratorConfig

ROLE_OF_SYSTEM = {g.DRAFT_SYSTEM: "draft", g.CHECKLIST_SYSTEM: "checklist",
                  g.EVALUATE_SYSTEM: "evaluate", g.REVISE_SYSTEM: "revise", g.COT_SYSTEM: "cot",
                  g.JUDGE_SYSTEM: "score", g.PREFER_SYSTEM: "prefer"}


def _section(text: str, name: str) -> str:
    """The block after `name:\\n` up to the next blank line."""
    return text.split(f"{name}:\n", 1)[1].split("\n\n", 1)[0]


class ChatServer:
    def __init__(self, draft_error_rate: float = 0.5, stall_s: float = 2.0):
        self.oracle = ArithmeticOracle(GeneratorConfig(error_rate=draft_error_rate, seed=3))
        self.fixer = ArithmeticOracle(GeneratorConfig(error_rate=0.0))
        self.requests: list[tuple[str, str]] = []
        self.fail_next = self.stall_next = 0
        self.always_fail = False
        self.stall_s = stall_s
        self.delay_s = 0.0
        """Every answer takes this long (a slow model, so a test can kill a client mid-run)."""
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    fail = server.always_fail or server.fail_next > 0
                    stall = not fail and server.stall_next > 0
                    server.fail_next -= fail and server.fail_next > 0
                    server.stall_next -= stall
                if stall:
                    time.sleep(server.stall_s)
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": f"no route {self.path}"})
                if fail:
                    return self._send(500, {"error": "injected failure"})
                time.sleep(server.delay_s)
                text = server.answer(body["messages"])
                self._send(200, {"choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, messages: list[dict]) -> str:
        role = ROLE_OF_SYSTEM[messages[0]["content"]]
        user = messages[1]["content"]
        with self.lock:
            self.requests.append((role, user))
        if role == "draft":
            return self.oracle.draft([user])[0]
        if role == "checklist":  # the user turn is the bare instruction
            return "\n".join(f"- {item}" for item in self.oracle.checklist([user])[0])
        prompt = _section(user, "Instruction")
        if role == "evaluate":
            items = [line.split(". ", 1)[1] for line in _section(user, "Checklist").splitlines()]
            answer = user.split("Answer:\n", 1)[1]
            verdicts = self.oracle.evaluate([prompt], [items], [answer])[0]
            return "\n".join(f"{i}. PASS" if v.passed else f"{i}. FAIL: {v.critique}"
                             for i, v in enumerate(verdicts, 1))
        if role == "revise":
            return self.fixer.draft([prompt])[0]
        if role == "score":  # a judge that answers in words around its rating
            ok = self.fixer.score([prompt], [user.split("Answer:\n", 1)[1]])[0]
            return f"Fair enough. Score: {10 * ok:.0f}"
        if role == "prefer":
            a = _section(user, "Answer A")
            b = user.split("Answer B:\n", 1)[1]
            p = self.fixer.prefer([prompt], [a], [b])[0]
            return {1.0: "A", 0.0: "B"}.get(p, "Both are equally good.")
        cot = self.oracle.reconstruct_cot([prompt], [user.split("Final answer:\n", 1)[1]])[0]
        return f"Summary: {cot.summary}\nReasoning: {cot.reasoning}"

    def __enter__(self) -> "ChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

"""The optional LLM judge against a tiny OpenAI-compatible server on 127.0.0.1 (started and stopped here), and
how its score is reported beside the rule-based one."""

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmbench_merge import MergeError
from mmbench_merge.evaluation import TaskScore, judge
from mmbench_merge.evaluation.rows import score_rows


@contextmanager
def chat_server(reply="12", status=200):
    """A loopback chat-completions endpoint answering `reply`; yields (base_url, requests seen)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _fresh_judge(monkeypatch):
    judge.get_judge.cache_clear()
    for var in (judge.MODEL_ENV, judge.URL_ENV, "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    yield
    judge.get_judge.cache_clear()


def test_openai_compatible_client_request_and_reply(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with chat_server(reply="  60 ") as (url, seen):
        client = judge.OpenAIJudge("judge-model", url, timeout=5)
        assert client.complete("hello") == "  60 "
    (request,) = seen
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "judge-model" and request["body"]["temperature"] == 0
    assert request["body"]["messages"] == [{"role": "user", "content": "hello"}]


def test_mathvista_reports_rule_based_and_judged_scores(monkeypatch):
    from mmbench_merge.evaluation.tasks.paper import utils

    doc = {"query": "Find the perimeter.", "question_type": "free_form", "answer_type": "integer", "choices": None,
           "answer": "12", "precision": None,
           "metadata": {"skills": ["geometry reasoning"], "task": "geometry problem solving"}}  # fmt: skip
    response = "The perimeter is 12 and the area is 36"
    assert set(utils.mathvista_results(doc, [response])) == {"geo_acc"}  # no judge: rules only
    with chat_server(reply="12") as (url, seen):
        monkeypatch.setenv(judge.MODEL_ENV, "judge-model")
        monkeypatch.setenv(judge.URL_ENV, url)
        out = utils.mathvista_results(doc, [response])
    assert out["geo_acc"]["score"] == 0.0 and out["geo_acc_judge"]["score"] == 1.0
    assert out["geo_acc_judge"]["categories"] == out["geo_acc"]["categories"]
    prompt = seen[0]["body"]["messages"][0]["content"]
    assert "Find the perimeter." in prompt and response in prompt


def test_mathvision_judge_extracts_and_the_checker_compares(monkeypatch):
    from mmbench_merge.evaluation.tasks.paper import utils

    doc = {"question": "Find the angle.", "options": ["30", "60"], "answer": "B", "subject": "metric geometry - angle"}
    with chat_server(reply="NONE") as (url, _):
        monkeypatch.setenv(judge.MODEL_ENV, "judge-model")
        monkeypatch.setenv(judge.URL_ENV, url)
        out = utils.mathvision_results(doc, ["I cannot tell."])
    assert out["geo_acc_judge"]["score"] == 0.0  # the judge found no answer


def test_judge_failures_are_one_line(monkeypatch):
    with chat_server(status=500) as (url, _):
        with pytest.raises(MergeError, match=r"evaluator.judge: http://127.0.0.1:\d+/v1/chat/completions answered HTTP 500"):
            judge.OpenAIJudge("m", url, timeout=5).complete("x")
    # the server is gone: its port refuses connections
    with pytest.raises(MergeError, match="evaluator.judge: cannot reach http://127.0.0.1"):
        judge.OpenAIJudge("m", url, timeout=5).complete("x")


def test_judged_score_is_a_row_but_not_in_the_averages():
    from mmbench_merge.evaluation.lmms import scores_from_results

    spec = type("Spec", (), {"name": "mmb_mathvista_geo", "metric": "geo_acc", "category": "Geometry",
                             "label": "MathVista", "scale": 100.0})()  # fmt: skip
    results = {"results": {"mmb_mathvista_geo": {"geo_acc,none": 0.4, "geo_acc_judge,none": 0.6}},
               "n-samples": {"mmb_mathvista_geo": {"effective": 10}}}  # fmt: skip
    scores = scores_from_results(results, [spec])
    assert [(s.metric, s.value, s.headline) for s in scores] == [("geo_acc", 40.0, True), ("geo_acc_judge", 60.0, False)]
    other = TaskScore("t2", "OCR", "exact_match", "T2", 80.0, 5)
    rows = {(r["task"], r["metric"]): r["value"] for r in score_rows([*scores, other])}
    assert rows[("mmb_mathvista_geo", "geo_acc_judge")] == 60.0
    assert rows[("avg:Geometry", "average")] == 40.0 and rows[("avg:all", "average")] == 60.0  # (40 + 80) / 2


def test_judge_env_sets_and_restores(monkeypatch):
    from mmbench_merge.evaluation.lmms import judge_env

    with judge_env("gpt-4o-mini", "http://127.0.0.1:1/v1"):
        assert judge.configured() == "gpt-4o-mini"
    assert judge.configured() is None
    with judge_env(None):
        assert judge.configured() is None

"""Optional LLM judge for MathVista / MathVision answers (the paper extracted them with GPT-4o-mini).

`evaluator.judge=<model>` turns it on; the rule-based scorer stays the headline (`geo_acc`) and the judged score
is reported beside it (`geo_acc_judge`). Two kinds of judge:

- an OpenAI-compatible chat-completions endpoint: `evaluator.judge=gpt-4o-mini` (or any served model name) with
  `evaluator.judge_url` (default: $OPENAI_BASE_URL, else https://api.openai.com/v1) and the key in
  $OPENAI_API_KEY (optional: local servers such as vLLM or llama.cpp need none);
- a local Hugging Face model: `evaluator.judge=hf:<directory or hub id>` (greedy decoding with its chat
  template, on the evaluation's process; transformers is imported only then).

The judge only extracts the final answer from the model's response; the comparison with the gold answer stays
the benchmark's rule (metrics.mathvista_score / mathvision_score on the extracted text). Judge errors are one
MergeError line naming the endpoint; nothing is retried silently into a wrong score.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from functools import lru_cache

from .. import MergeError

MODEL_ENV = "MMBENCH_JUDGE_MODEL"  # set by the evaluator from evaluator.judge for the task hooks
URL_ENV = "MMBENCH_JUDGE_URL"  # from evaluator.judge_url
DEFAULT_URL = "https://api.openai.com/v1"
TIMEOUT_S = 60.0
MAX_TOKENS = 32

PROMPT = (
    "You read a student's response to a math problem and write down the final answer it gives, nothing else.\n"
    "- Multiple choice: reply with the text of the chosen option exactly as listed (not its letter).\n"
    "- Numeric: reply with the number only (a fraction as a decimal), without units.\n"
    "- If the response gives no answer, reply with NONE.\n\n"
    "Problem:\n{question}\n\nResponse:\n{response}\n\nFinal answer:"
)


def configured() -> str | None:
    return os.environ.get(MODEL_ENV) or None


def extraction_prompt(question: str, response: str) -> str:
    return PROMPT.format(question=question.strip(), response=(response or "").strip())


def extract(question: str, response: str) -> str | None:
    """The judge's reading of the final answer in `response` (None when it finds none)."""
    spec = configured()
    if not spec:
        raise MergeError("evaluator.judge is not set")
    reply = get_judge(spec, os.environ.get(URL_ENV) or None).complete(extraction_prompt(question, response))
    reply = reply.strip().strip("`").strip()
    if not reply or reply.upper() == "NONE":
        return None
    return reply


@lru_cache(maxsize=4)
def get_judge(spec: str, url: str | None = None):
    if spec.startswith("hf:"):
        return HFJudge(spec[3:])
    return OpenAIJudge(spec, url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_URL)


class OpenAIJudge:
    """POST {base_url}/chat/completions with one user message, temperature 0 (stdlib HTTP, no SDK)."""

    def __init__(self, model: str, base_url: str, api_key: str | None = None, timeout: float = TIMEOUT_S):
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout

    def complete(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": MAX_TOKENS}  # fmt: skip
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                payload = json.loads(reply.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            raise MergeError(f"evaluator.judge: {self.url} answered HTTP {exc.code} ({exc.reason})") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise MergeError(f"evaluator.judge: cannot reach {self.url} ({exc})") from None
        except ValueError:
            raise MergeError(f"evaluator.judge: {self.url} did not answer JSON") from None
        try:
            return str(payload["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise MergeError(f"evaluator.judge: {self.url} answered without choices[0].message.content") from None


class HFJudge:
    """A local causal LM, greedy, with its chat template."""

    def __init__(self, path: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        except (OSError, ValueError) as exc:
            raise MergeError(f"evaluator.judge: cannot load hf:{path} ({str(exc).splitlines()[0]})") from None
        self.model.eval()

    def complete(self, prompt: str) -> str:
        import torch

        messages = [{"role": "user", "content": prompt}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        inputs = self.tokenizer(text, return_tensors="pt").to(self.model.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

"""The `openai` package as installed in the compat venv, against our server's /v1 API.

    python openai_client.py http://127.0.0.1:PORT MODEL  -> prints one JSON object with the results

test_compat_clients.py checks the values (streamed == non-streamed at temperature 0, usage counts, ...).
"""

import json
import sys

import openai


def main() -> None:
    url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    out = {"openai_version": openai.__version__, "models": [m.id for m in client.models.list().data]}

    kw = dict(model=model, prompt="The capital of France is", max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    c = client.completions.create(**kw)
    out["completion"] = {"text": c.choices[0].text, "finish_reason": c.choices[0].finish_reason,
                         "usage": c.usage.model_dump()}
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    out["completion_stream"] = {"text": "".join(ch.choices[0].text for ch in chunks if ch.choices),
                                "usage": chunks[-1].usage.model_dump() if chunks[-1].usage else None}

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ckw = dict(model=model, messages=msgs, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**ckw)
    out["chat"] = {"content": r.choices[0].message.content, "role": r.choices[0].message.role,
                   "finish_reason": r.choices[0].finish_reason, "usage": r.usage.model_dump()}
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **ckw))
    out["chat_stream"] = {
        "first_role": chunks[0].choices[0].delta.role,
        "content": "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
        "usage": chunks[-1].usage.model_dump() if chunks[-1].usage else None,
    }
    r = client.completions.create(model="no-such-model", prompt="Hi", max_tokens=1)  # any name is served
    out["other_model_name"] = {"model": r.model, "completion_tokens": r.usage.completion_tokens}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

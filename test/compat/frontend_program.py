"""SGLang frontend-language programs (PyPI sglang==0.5.2, run in test/.cache/compat-venv) against our server.

    python frontend_program.py http://127.0.0.1:PORT  -> prints one JSON object with every program's result

Exercises sgl.function with gen (plain, stop, regex, int dtype), select, fork, run_batch and streaming,
all through sgl.RuntimeEndpoint (the native /generate, /get_model_info, /flush_cache API).
The test (test_compat_clients.py) checks the values.
"""

import json
import sys

import sglang as sgl


@sgl.function
def plain(s, question):
    s += "Q: " + question + "\nA:"
    s += sgl.gen("answer", max_tokens=8, temperature=0)


@sgl.function
def constrained(s):
    s += "The capital of France is"
    s += sgl.gen("city", max_tokens=8, regex=r" (Paris|London|Rome)", temperature=0)
    s += ". Population in millions:"
    s += sgl.gen("number", max_tokens=6, regex=r" [0-9]{1,2}", temperature=0)


@sgl.function
def choose(s):
    s += "The weather is sunny, the sky is"
    s += sgl.select("color", choices=[" blue", " green", " purple"])


@sgl.function
def forked(s):
    s += "Once upon a time"
    forks = s.fork(3)
    for i, f in enumerate(forks):
        f += f" there was a server number {i}"
        f += sgl.gen("cont", max_tokens=4, temperature=0)
    s["branches"] = [f["cont"] for f in forks]
    forks.join()


@sgl.function
def stop_at(s):
    s += "Numbers: 0 1 2 3"
    s += sgl.gen("rest", max_tokens=16, stop=["\n"], temperature=0)


def main() -> None:
    url = sys.argv[1]
    backend = sgl.RuntimeEndpoint(url)
    sgl.set_default_backend(backend)
    out = {"model_path": backend.get_model_name()}

    st = plain.run(question="What is the capital of France?")
    out["plain"] = {"answer": st["answer"], "text": st.text(),
                    "meta": st.get_meta_info("answer")}

    st = constrained.run()
    out["constrained"] = {"city": st["city"], "number": st["number"]}

    st = choose.run()
    out["select"] = st["color"]

    st = forked.run()
    out["fork"] = st["branches"]

    st = stop_at.run()
    out["stop"] = st["rest"]

    states = plain.run_batch([{"question": q} for q in ("Hello?", "What is 2+2?", "Who are you?")],
                             num_threads=3, progress_bar=False)
    out["batch"] = [s["answer"] for s in states]
    out["batch_single"] = [plain.run(question=q)["answer"] for q in ("Hello?", "What is 2+2?", "Who are you?")]

    st = plain.run(question="What is the capital of France?", stream=True)
    pieces = list(st.text_iter("answer"))
    out["stream"] = {"pieces": pieces, "joined": "".join(pieces), "final": st["answer"]}

    backend.flush_cache()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

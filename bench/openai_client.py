"""Drive a running `legora serve` with the official `openai` Python client.

    legora serve --model demo/base --adapter a=PATH &
    python bench/openai_client.py --base-url http://127.0.0.1:8000/v1 [--model a]

Lists the models, asks one chat completion, streams one completion, and shows the
error object of a request for an unknown model. Prints what the server answered.
"""

import argparse
import sys

import openai


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", default=None, help="model for the chat (default: the first listed)")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=60, max_retries=0)

    models = client.models.list()
    print("models:", ", ".join(m.id for m in models.data))
    model = args.model or models.data[0].id

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me about the cat."}],
        max_tokens=16,
        temperature=0,
    )
    print(f"chat ({model}):", repr(chat.choices[0].message.content))
    print("  finish_reason:", chat.choices[0].finish_reason, "| usage:", chat.usage.model_dump())

    print(f"stream ({model}): ", end="")
    pieces = []
    stream = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
    print(repr("".join(pieces)), f"in {len(pieces)} chunks")
    print("  usage:", usage.model_dump() if usage else None)

    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        print("error case: no error?!")
        return 1
    except openai.NotFoundError as e:
        print("error case:", e.status_code, e.body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``openai`` caption engine: each image and its prompt as one request to an OpenAI-compatible
``/v1/chat/completions`` server (vLLM, SGLang, TGI, ``transformers serve``).

The image travels as a base64 data URL: the stored bytes when they are JPEG, PNG or WebP (and need no EXIF
rotation and have no alpha, so the server sees the pixels the in-process engine would), else re-encoded
from the decoded image, at ``caption.server.image`` settings.  ``concurrency`` requests are in flight at
once; a request that gets a 429, a 5xx, a timeout or a connection error is retried with exponential
backoff, and one that still fails is a ``CaptionFailed`` carrying the server's message.  The API key is read
from the environment variable the recipe names and never appears in a message.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from densefusion_hf.errors import UserError
from densefusion_hf.fusion.engine import CaptionFailed, model_name
from densefusion_hf.fusion.priors import Priors, failure_reason

STORED_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
RETRIED_STATUS = {408, 409, 425, 429}  # and every 5xx


def stored_format(blob: bytes | None) -> str | None:
    """The data-URL subtype of ``blob`` when it can be sent as stored: JPEG, PNG or WebP, upright (no EXIF
    rotation) and opaque; None when the decoded image must be re-encoded instead."""
    if not blob:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as image:  # reads the header only
            subtype = STORED_FORMATS.get(image.format or "")
            if subtype is None or image.getexif().get(0x0112, 1) != 1:
                return None
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                return None
            return subtype
    except Exception:  # noqa: BLE001 - undecodable headers are re-encoded from the decoded image
        return None


def image_data_url(image, blob: bytes | None, settings) -> str:
    """The image as a data URL, per ``caption.server.image`` (``settings``)."""
    subtype = stored_format(blob) if settings.max_side is None and settings.format is None else None
    if subtype is not None and (settings.format in (None, subtype)):
        data = blob
    else:
        from PIL import Image

        if settings.max_side and max(image.size) > settings.max_side:
            scale = settings.max_side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        subtype = settings.format or "png"
        buffer = io.BytesIO()
        options = {} if subtype == "png" else {"quality": settings.quality}
        image.save(buffer, format=subtype.upper(), **options)
        data = buffer.getvalue()
    return f"data:image/{subtype};base64,{base64.b64encode(data).decode('ascii')}"


def generation_fields(generation, style: str) -> dict:
    """The recipe's generation settings as request fields.

    ``openai``: the OpenAI fields plus ``repetition_penalty``, which vLLM and SGLang take as an extra field.
    ``transformers``: ``transformers serve`` refuses unknown fields, so the settings go in its own
    ``generation_config`` field, as the transformers engine passes them to ``generate``.
    """
    if style == "transformers":
        config = {"max_new_tokens": generation.max_new_tokens, "do_sample": generation.do_sample,
                  "repetition_penalty": generation.repetition_penalty}
        if generation.do_sample:
            config.update(temperature=generation.temperature, top_p=generation.top_p)
        fields = {"generation_config": json.dumps(config)}
        if generation.do_sample:
            fields["seed"] = generation.seed
        return fields
    fields = {"max_tokens": generation.max_new_tokens, "temperature": 0.0}
    if generation.do_sample:
        fields.update(temperature=generation.temperature, top_p=generation.top_p, seed=generation.seed)
    if generation.repetition_penalty != 1.0:
        fields["repetition_penalty"] = generation.repetition_penalty
    return fields


def server_message(response) -> str:
    """What the server said about an error: OpenAI's ``error.message``, FastAPI's ``detail``, or the text."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if payload.get("detail"):
            return str(payload["detail"])
        if payload.get("message"):
            return str(payload["message"])
    text = " ".join(response.text.split())
    return text[:500] or response.reason_phrase or "no message"


NODE_PLACEHOLDER = "{node_ip}"


def node_address() -> str:
    """This node's address as Ray knows it inside a Ray worker; 127.0.0.1 anywhere else."""
    try:
        import ray
    except ImportError:
        return "127.0.0.1"
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def server_url(base_url: str) -> str:
    """``caption.server.base_url`` for this worker: ``{node_ip}`` becomes its node's address, so that with one
    server per GPU node every caption actor talks to the server on its own node."""
    return base_url.replace(NODE_PLACEHOLDER, node_address()) if NODE_PLACEHOLDER in base_url else base_url


class OpenAiEngine:
    """Captions through an OpenAI-compatible chat completions server."""

    def __init__(self, caption, prompt_version: str):
        import httpx

        server = caption.server
        self.settings = server
        self.served_model = caption.model
        self.name = model_name(caption.model)
        self.prompt_version = prompt_version
        self.url = server_url(server.base_url).rstrip("/") + "/chat/completions"
        self._secret = None
        headers = {}
        if server.api_key_env:
            self._secret = os.environ.get(server.api_key_env)
            if not self._secret:
                raise UserError(f"caption.server.api_key_env names the environment variable {server.api_key_env}, "
                                f"which is not set; export it with the server's API key (or set api_key_env to "
                                f"null for a server without one).")
            headers["Authorization"] = f"Bearer {self._secret}"
        self.fields = generation_fields(caption.generation, server.generation_fields)
        self.client = httpx.Client(timeout=server.timeout, headers=headers, trust_env=False,
                                   limits=httpx.Limits(max_connections=server.concurrency,
                                                       max_keepalive_connections=server.concurrency))
        self.threads = ThreadPoolExecutor(server.concurrency, thread_name_prefix="caption-request")
        self.seconds: Counter = Counter()  # encode / request / parse, summed over requests (for benchmarks)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.threads.shutdown(wait=True)
        self.client.close()

    def caption(self, images: list, priors: list[Priors], prompts: list[str],
                blobs: list | None = None) -> list[str | Exception]:
        blobs = blobs if blobs is not None else [None] * len(images)
        futures = [self.threads.submit(self._caption_one, image, blob, prompt)
                   for image, blob, prompt in zip(images, blobs, prompts)]
        return [future.result() for future in futures]

    def _timed(self, step: str, started: float) -> None:
        with self._lock:
            self.seconds[step] += time.perf_counter() - started

    def _caption_one(self, image, blob, prompt: str) -> str | Exception:
        try:
            started = time.perf_counter()
            body = {"model": self.served_model, "stream": False, **self.fields,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": image_data_url(image, blob, self.settings.image)}},
                        {"type": "text", "text": prompt}]}]}
            payload = json.dumps(body).encode()
            self._timed("encode", started)
            started = time.perf_counter()
            response = self._post(payload)
            self._timed("request", started)
            started = time.perf_counter()
            text = self._reply(response)
            self._timed("parse", started)
            return text.strip()
        except CaptionFailed as exc:
            return CaptionFailed(self._redact(str(exc)))
        except Exception as exc:  # noqa: BLE001 - one request's failure costs one caption
            return CaptionFailed(self._redact(failure_reason(exc)))

    def _post(self, payload: bytes):
        import httpx

        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            wait = self.settings.backoff * 2 ** attempt
            try:
                response = self.client.post(self.url, content=payload, headers={"Content-Type": "application/json"})
            except httpx.TransportError as exc:
                problem = (f"cannot reach the caption server at {self.url} ({type(exc).__name__}: "
                           f"{exc or 'no message'}); check that it runs and caption.server.base_url")
            else:
                if response.status_code < 400:
                    return response
                problem = f"HTTP {response.status_code} from {self.url}: {server_message(response)}"
                if response.status_code not in RETRIED_STATUS and response.status_code < 500:
                    if "repetition_penalty" in problem and "generation_config" not in self.fields:
                        problem += " (a transformers serve server: set caption.server.generation_fields: transformers)"
                    raise CaptionFailed(problem)  # the request itself is wrong: asking again changes nothing
                wait = max(wait, _retry_after(response))
            if attempt + 1 < attempts:
                time.sleep(min(wait, 120.0))
        raise CaptionFailed(f"{problem} (after {attempts} attempt{'s' if attempts > 1 else ''})")

    def _reply(self, response) -> str:
        try:
            choice = response.json()["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise CaptionFailed(f"the server at {self.url} answered without a chat completion: "
                                f"{' '.join(response.text.split())[:300]}") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content or ""

    def _redact(self, message: str) -> str:
        return message.replace(self._secret, "***") if self._secret else message


def _retry_after(response) -> float:
    try:
        return float(response.headers.get("Retry-After", 0))
    except ValueError:
        return 0.0

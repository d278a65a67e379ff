"""The caption prompt: a template file (YAML front matter with ``prompt_version``, then a Jinja body)
rendered with one image's priors.

The package's template is the paper's Perceptual Fusion prompt; a recipe may name its own file
(``caption.prompt_template``).  The version travels with every caption (the ``prompt_version`` column),
so captions made with different prompts are never mixed up.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from densefusion_hf.errors import UserError
from densefusion_hf.fusion.priors import Priors, format_box, format_tags

DEFAULT_TEMPLATE = Path(__file__).parent / "templates" / "perceptual-fusion-v1.txt"
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)


@dataclass
class PromptTemplate:
    path: Path
    prompt_version: str
    body: str
    sha256: str

    @classmethod
    def load(cls, path: Path | None = None) -> "PromptTemplate":
        path = Path(path) if path else DEFAULT_TEMPLATE
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"caption.prompt_template: cannot read {path}: {exc.strerror or exc}.") from None
        match = _FRONT_MATTER.match(text)
        meta = yaml.safe_load(match.group(1)) if match else None
        version = meta.get("prompt_version") if isinstance(meta, dict) else None
        if not isinstance(version, str) or not version.strip():
            raise UserError(f"{path}: a prompt template starts with front matter naming its version:\n"
                            f"---\nprompt_version: my-prompt-v1\n---\nthen the Jinja text of the prompt "
                            f"(see {DEFAULT_TEMPLATE}).")
        template = cls(path, version.strip(), text[match.end():], hashlib.sha256(text.encode()).hexdigest())
        template._compiled()  # a syntax error is reported now, not after the experts have run
        return template

    def _compiled(self):
        if not hasattr(self, "_jinja"):
            import jinja2

            env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                                     autoescape=False)
            try:
                self._jinja = env.from_string(self.body)
            except jinja2.TemplateSyntaxError as exc:
                raise UserError(f"{self.path}: line {exc.lineno + self.body_line_offset()}: "
                                f"template syntax error: {exc.message}") from None
        return self._jinja

    def body_line_offset(self) -> int:
        return self.path.read_text(encoding="utf-8").count("\n") - self.body.count("\n")

    def render(self, priors: Priors) -> str:
        import jinja2

        try:
            return self._compiled().render(
                world_knowledge=priors.alt_text,
                tags=[t.label for t in priors.tags],
                tags_text=format_tags(priors.tags),
                boxes=[format_box(b) for b in priors.boxes],
                ocr=[line.text for line in priors.ocr],
            ).strip()
        except jinja2.UndefinedError as exc:
            raise UserError(f"{self.path}: {exc.message}; the variables are world_knowledge, tags, tags_text, "
                            f"boxes and ocr.") from None

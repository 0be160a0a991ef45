"""Image-preference pairs: the canonical manifest, converters from public layouts, and iteration order.

Canonical manifest: JSONL, one pair per line::

    {"prompt": "a red circle", "image_1": "imgs/0001_1.png", "image_2": "/abs/0001_2.jpg", "preferred": 1,
     "id": "optional", "votes": [12, 3]}

Image paths are absolute or relative to the manifest's folder. ``preferred`` is 1 or 2.

Bad rows (not UTF-8, invalid JSON, empty prompt or one holding a special token such as ``<|image_pad|>``,
label not 1/2, missing or unreadable image, an image too large or too elongated) raise :class:`DataError`
naming the file and line by default; with ``skip_bad=True`` they are skipped and listed in a
:class:`DataReport`. For training, :class:`ManifestDataset` with ``on_bad_row="skip"`` replaces each bad
row by the next good one and reports it. Nothing is dropped silently.

Modules:

- ``schema``: :class:`PreferenceExample`, a manifest row (:class:`PairRecord`) and the one check every
  row passes (``check_row``), :class:`DataReport` / :class:`BadRow`;
- ``manifest``: :func:`read_manifest`, :func:`write_manifest`, :func:`validate`, :class:`ManifestDataset`;
- ``convert``: :func:`convert` from Rapidata Parquet, HPDv2 and ImageReward JSON
  (``python -m lgrpo.data convert --from FORMAT SRC DST``);
- ``order``: :class:`PromptOrder`, the seeded per-epoch order the trainer draws prompts in (the same on
  any number of ranks; its state is two integers, so a run resumes exactly);
- ``cli``: ``python -m lgrpo.data convert ...`` / ``validate MANIFEST``.
"""

from ..images import open_image  # the one way a manifest image opens
from .cli import main
from .convert import FORMATS, convert, json_entries
from .manifest import CHECK_LEVELS, ON_BAD_ROW, ManifestDataset, read_manifest, validate, write_manifest
from .order import PromptOrder
from .schema import SPECIAL_TOKEN_RE, BadRow, DataError, DataReport, PairRecord, PreferenceExample

__all__ = [
    "CHECK_LEVELS", "FORMATS", "ON_BAD_ROW", "SPECIAL_TOKEN_RE", "BadRow", "DataError", "DataReport",
    "ManifestDataset", "PairRecord", "PreferenceExample", "PromptOrder", "convert", "json_entries", "main",
    "open_image", "read_manifest", "validate", "write_manifest",
]

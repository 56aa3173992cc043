"""Coded segment descriptions for DICOM SEG: label name -> SNOMED CT category, type, laterality.

The table covers the structures the shipped configs (``configs/*.yaml``), dataset manifests
(``data_manifests/*.json``) and the demo's phantom name, and most of TotalSegmentator's
``total`` task. Category codes come from DICOM CID 7150 (Segmentation Property Categories),
type codes from CID 7166/CID 4 (anatomic structures) or CID 7159-style morphology, and the
laterality modifier from CID 244 (Right 24028007, Left 7771000), which goes into
SegmentedPropertyTypeModifierCodeSequence. A left and a right structure therefore share a type
code and differ in their modifier, as DICOM PS3.3 C.8.20.2 intends.

Names are matched after :func:`normalize`: case, ``_``/``-``/spaces and punctuation do not
matter, and a ``left``/``right`` word anywhere is taken as the laterality, so
``kidney_left``, ``Left kidney`` and ``left-kidney`` are one structure.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

SCT = "SCT"

ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")
TISSUE = ("85756007", "Tissue")
MORPHOLOGICALLY_ALTERED = ("49755003", "Morphologically Altered Structure")
RIGHT = ("24028007", "Right")
LEFT = ("7771000", "Left")


@dataclass(frozen=True)
class SegmentCode:
    """One structure's codes: SNOMED CT (scheme ``SCT``) value and meaning pairs."""

    category: tuple[str, str]
    type: tuple[str, str]
    laterality: tuple[str, str] | None = None
    known: bool = True
    """False for the generic "Tissue" fallback of a name the table does not hold."""


# base name (normalised, no laterality) -> (category, type); names with a laterality word
# are looked up without it and get the modifier.
_A = ANATOMICAL_STRUCTURE
_M = MORPHOLOGICALLY_ALTERED
_TABLE: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    # BTCV / Synapse, MSD spleen, the phantom
    "spleen": (_A, ("78961009", "Spleen")),
    "kidney": (_A, ("64033007", "Kidney")),
    "gallbladder": (_A, ("28231008", "Gallbladder")),
    "esophagus": (_A, ("32849002", "Esophagus")),
    "liver": (_A, ("10200004", "Liver")),
    "stomach": (_A, ("69695003", "Stomach")),
    "aorta": (_A, ("15825003", "Aorta")),
    "inferior vena cava": (_A, ("64131007", "Inferior vena cava")),
    "portal vein and splenic vein": (_A, ("110765007", "Portal vein and splenic vein")),
    "pancreas": (_A, ("15776009", "Pancreas")),
    "adrenal gland": (_A, ("23451007", "Adrenal gland")),
    "spine": (_A, ("421060004", "Vertebral column")),
    "lung": (_A, ("39607008", "Lung")),
    # BraTS 2021, PI-CAI
    "necrotic tumour core": (_M, ("6574001", "Necrosis")),
    "peritumoral edema": (_M, ("79654002", "Edema")),
    "enhancing tumour": (_M, ("108369006", "Neoplasm")),
    "cspca lesion isup 2": (_M, ("52988006", "Lesion")),
    # TotalSegmentator (total)
    "lung upper lobe": (_A, ("45653009", "Upper lobe of lung")),
    "lung lower lobe": (_A, ("90572001", "Lower lobe of lung")),
    "lung middle lobe": (_A, ("72481006", "Middle lobe of right lung")),
    "trachea": (_A, ("44567001", "Trachea")),
    "thyroid gland": (_A, ("69748006", "Thyroid gland")),
    "small bowel": (_A, ("30315005", "Small intestine")),
    "duodenum": (_A, ("38848004", "Duodenum")),
    "colon": (_A, ("71854001", "Colon")),
    "urinary bladder": (_A, ("89837001", "Urinary bladder")),
    "prostate": (_A, ("41216001", "Prostate")),
    "sacrum": (_A, ("54735007", "Sacrum")),
    "heart": (_A, ("80891009", "Heart")),
    "brain": (_A, ("12738006", "Brain")),
    "skull": (_A, ("89546000", "Skull")),
    "sternum": (_A, ("56873002", "Sternum")),
    "spinal cord": (_A, ("2748008", "Spinal cord")),
    "superior vena cava": (_A, ("48345005", "Superior vena cava")),
    "pulmonary vein": (_A, ("122972007", "Pulmonary vein")),
    "brachiocephalic trunk": (_A, ("12691009", "Brachiocephalic artery")),
    "subclavian artery": (_A, ("29700009", "Subclavian artery")),
    "common carotid artery": (_A, ("32062004", "Common carotid artery")),
    "brachiocephalic vein": (_A, ("8887007", "Brachiocephalic vein")),
    "atrial appendage": (_A, ("68786006", "Auricular appendage")),
    "iliac artery": (_A, ("73634005", "Common iliac artery")),
    "iliac vena": (_A, ("46027005", "Common iliac vein")),
    "humerus": (_A, ("85050009", "Humerus")),
    "scapula": (_A, ("79601000", "Scapula")),
    "clavicula": (_A, ("51299004", "Clavicle")),
    "femur": (_A, ("71341001", "Femur")),
    "hip": (_A, ("29836001", "Hip")),
    "gluteus maximus": (_A, ("181674001", "Gluteus maximus muscle")),
    "gluteus medius": (_A, ("78333006", "Gluteus medius muscle")),
    "gluteus minimus": (_A, ("75297007", "Gluteus minimus muscle")),
    "autochthon": (_A, ("244849004", "Deep muscle of back")),
    "iliopsoas": (_A, ("68455001", "Iliopsoas muscle")),
    "costal cartilages": (_A, ("50016007", "Costal cartilage")),
    "vertebrae s1": (_A, ("65985001", "S1 vertebra")),
}
_VERTEBRAE = {
    "c1": "14806007", "c2": "39976000", "c3": "113205007", "c4": "5329002", "c5": "36978003", "c6": "36054005",
    "c7": "87391001", "t1": "64864005", "t2": "53733008", "t3": "1626008", "t4": "73071006", "t5": "56401006",
    "t6": "45296009", "t7": "62487009", "t8": "11068009", "t9": "82687006", "t10": "7610001", "t11": "12989004",
    "t12": "23215003", "l1": "66794005", "l2": "14293000", "l3": "36470004", "l4": "11994002", "l5": "49668003",
}
for _v, _code in _VERTEBRAE.items():
    _TABLE[f"vertebrae {_v}"] = (_A, (_code, f"{_v.upper()} vertebra"))
_RIBS = ["48535007", "78247007", "25888004", "25523003", "15339008", "59558009", "24915002", "5953002",
         "22565002", "77644006", "58830002", "43993008"]
_ORDINALS = ["First", "Second", "Third", "Fourth", "Fifth", "Sixth", "Seventh", "Eighth", "Ninth", "Tenth",
             "Eleventh", "Twelfth"]
for _i, (_code, _word) in enumerate(zip(_RIBS, _ORDINALS), start=1):
    _TABLE[f"rib {_i}"] = (_A, (_code, f"{_word} rib"))

# other spellings of a base name (normalised)
_ALIASES = {
    "gall bladder": "gallbladder",
    "oesophagus": "esophagus",
    "ivc": "inferior vena cava",
    "portal and splenic veins": "portal vein and splenic vein",
    "portal and splenic vein": "portal vein and splenic vein",
    "portal vein and splenic veins": "portal vein and splenic vein",
    "adrenal": "adrenal gland",
    "kidneys": "kidney",
    "vertebral column": "spine",
    "necrotic tumor core": "necrotic tumour core",
    "peritumoural edema": "peritumoral edema",
    "peritumoral oedema": "peritumoral edema",
    "enhancing tumor": "enhancing tumour",
    "small intestine": "small bowel",
    "bladder": "urinary bladder",
    "clavicle": "clavicula",
    "iliac vein": "iliac vena",
}

_SIDES = {"left": LEFT, "right": RIGHT}


def normalize(name: str) -> tuple[str, tuple[str, str] | None]:
    """``(base name, laterality)`` of a label name: lower case, every run of characters other
    than letters and digits one space, and a ``left``/``right`` word taken out as the laterality
    (``None`` when there is none, or when both words appear)."""
    words = re.sub(r"[^a-z0-9]+", " ", str(name).lower()).split()
    sides = {w for w in words if w in _SIDES}
    if len(sides) != 1:
        return " ".join(words), None
    (side,) = sides
    return " ".join(w for w in words if w != side), _SIDES[side]


def match_names(named: Mapping[int, str], names: Mapping[int, str]) -> tuple[dict[int, int], dict[int, str]]:
    """Map the numbers of ``named`` (a SEG's segments, an RTSTRUCT's ROIs) to the ids of ``names``
    (a label table) whose name is the same after :func:`normalize` (its aliases too): returns
    ``({number: id}, {number: name}`` of those no id is named after``)``."""
    def key(name: str) -> tuple[str, tuple[str, str] | None]:
        base, side = normalize(name)
        return _ALIASES.get(base, base), side

    ids = {key(v): int(k) for k, v in names.items()}
    matched, unmatched = {}, {}
    for n, name in named.items():
        if key(name) in ids:
            matched[int(n)] = ids[key(name)]
        else:
            unmatched[int(n)] = str(name)
    return matched, unmatched


def segment_code(name: str) -> SegmentCode:
    """The codes of one label name; a name the table does not hold gets the generic category
    and type "Tissue" (SCT 85756007) with ``known`` False (and keeps any laterality it names)."""
    base, side = normalize(name)
    base = _ALIASES.get(base, base)
    if base in _TABLE:
        category, type_ = _TABLE[base]
        return SegmentCode(category, type_, side)
    return SegmentCode(TISSUE, TISSUE, side, known=False)


def segment_codes(names: Mapping[int, str] | Iterable[str]) -> dict:
    """Codes for several label names (a ``{number: name}`` mapping keeps its keys, a list is
    keyed by name), with ONE warning naming every name the table does not know."""
    items = dict(names) if isinstance(names, Mapping) else {n: n for n in names}
    codes = {k: segment_code(v) for k, v in items.items()}
    unknown = [str(items[k]) for k, c in codes.items() if not c.known]
    if unknown:
        log.warning("no SNOMED CT code known for label name(s) %s; coded as the generic \"Tissue\" (SCT 85756007)",
                    ", ".join(repr(u) for u in unknown))
    return codes

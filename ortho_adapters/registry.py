"""Extend PEFT's ``PeftType`` enum and register ortho_adapters' tuners.

PEFT's :func:`peft.utils.register_peft_method` only accepts names that are members of
:class:`peft.utils.PeftType`, and PEFT has no plugin entry point, so the members are added to the
str-enum at import time. A member's name equals its value, exactly like PEFT's own members.
"""

from __future__ import annotations

import enum

from peft.utils import PeftType, register_peft_method

# peft_type -> state-dict prefix (the project's public contract, see README).
PEFT_TYPES: dict[str, str] = {
    "LORA_SB": "lora_sb_",
    "LOLDU": "loldu_",
    "HUT": "hut_",
    "FEDSVD": "fedsvd_",
    "ORTHO_LORA": "ortho_lora_",
    "O3": "o3_",
}

# Names of the members this package added (as opposed to PEFT's own). Kept on the enum class itself so
# that it survives a reload of this module.
_ADDED_ATTR = "_ortho_adapters_added_"


def _added() -> set[str]:
    added = PeftType.__dict__.get(_ADDED_ATTR)
    if added is None:
        added = set()
        type.__setattr__(PeftType, _ADDED_ATTR, added)
    return added


def _add_enum_member(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """Add ``name = name`` to a str-enum after class creation (CPython 3.11 .. 3.13+)."""
    add_member = getattr(enum.EnumType, "_add_member_", None)
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member.__init__(name)
    if add_member is not None:  # CPython >= 3.13
        enum_cls._add_member_(name, member)
    else:
        type.__setattr__(enum_cls, name, member)
        enum_cls._member_names_.append(name)
        enum_cls._member_map_[name] = member
        enum_cls._value2member_map_[name] = member
    return member


def peft_type(name: str) -> PeftType:
    """Return the ``PeftType`` member for one of this package's methods, adding it if needed.

    Raises:
        ValueError: ``name`` is not one of this package's types, or PEFT already ships a method of
            that name (a clash this package must not paper over).
    """
    if name not in PEFT_TYPES:
        raise ValueError(f"{name!r} is not an ortho_adapters PEFT type; known: {sorted(PEFT_TYPES)}")
    if name in PeftType.__members__:
        if name not in _added():
            raise ValueError(
                f"PEFT itself already defines PeftType.{name}; ortho_adapters' method of the same name would "
                "shadow it. Pin a PEFT version without it or rename the ortho_adapters type."
            )
        return PeftType[name]
    member = _add_enum_member(PeftType, name)
    _added().add(name)
    return member


def register(name: str, config_cls: type, model_cls: type) -> None:
    """Register one tuner with PEFT under ``name`` (idempotent: a second import is harmless)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    member = peft_type(name)
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(member) is config_cls:
        return
    if member in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(
            f"PeftType.{name} is already registered with {PEFT_TYPE_TO_CONFIG_MAPPING[member]!r}"
        )
    register_peft_method(
        name=name.lower(), config_cls=config_cls, model_cls=model_cls, prefix=PEFT_TYPES[name]
    )

"""hotswap's adapter registry: immutable, content-addressed versions of bases, adapters and
full fine-tuned models, with aliases, metadata, lineage and compatibility checks.

The trainer and the server use only what this module exports."""

from .compat import classifier_label_names, classifier_labels, is_classifier
from .errors import (
    CorruptionError,
    HubError,
    ImportFailed,
    IncompatibleAdapter,
    InUseError,
    InvalidMetadata,
    InvalidName,
    NotFoundError,
    RemoteError,
    UnsafeContent,
)
from .index import AliasEvent
from .metadata import KINDS, EntryMetadata
from .refs import LATEST, Ref, check_alias, check_identifier, parse_ref
from .registry import Registry, default_home
from .versions import Problem, PublishResult, Snapshot, Version

__all__ = [
    "AliasEvent", "CorruptionError", "EntryMetadata", "HubError", "ImportFailed", "IncompatibleAdapter",
    "InUseError", "InvalidMetadata", "InvalidName", "KINDS", "LATEST", "NotFoundError", "Problem",
    "PublishResult", "Ref", "Registry", "RemoteError", "Snapshot", "UnsafeContent", "Version",
    "check_alias", "check_identifier", "classifier_label_names", "classifier_labels", "default_home", "is_classifier", "parse_ref",
]

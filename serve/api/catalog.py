"""What a caller may ask for: resolving `model` for one key, and listing models and adapters.

The engine resolves references (it owns what "the base" means); this module adds the caller's view:
a key's adapter patterns are checked before anything is looked up, and "nearest names" hints are drawn
only from entries the caller may see, so no tenant learns another's adapter names.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from hotswap.hub import HubError, InvalidName, NotFoundError, Ref, Registry, Version, classifier_label_names, parse_ref

from ..engine import AdapterNotFound, AdapterResidency, Engine, EngineNotReady, Target
from ..lora.compose import is_composite, parse_composite
from .admin_schemas import AdapterInfo, Residency
from .auth import Principal
from .exceptions import ApiProblem, BadReference, Forbidden, UnknownModel
from .hub_access import HubAccess
from .openai_schemas import ModelCard
from .settings import ServerSettings

SERVED_KINDS = ("adapter", "model")


class Catalog:
    def __init__(self, engine: Engine, hub: HubAccess, settings: ServerSettings) -> None:
        self.engine = engine
        self.hub = hub
        self.settings = settings
        self.labels = LabelNames()
        self.start_error: str | None = None  # why the engine failed to start (set by the app; shown by /ready)

    def base_name(self) -> str:
        return self.engine.base.ref.partition("@")[0]

    def down_reason(self) -> str | None:
        """Why the engine will never serve (it failed to start, or its loop died), or None."""
        return f"failed to start: {self.start_error}" if self.start_error else self.engine.failure

    def _require_ready(self) -> None:
        if not self.engine.ready:
            if reason := self.down_reason():  # it will not come up: not "still loading"
                raise EngineNotReady(f"the engine cannot serve ({reason}); restart the server once fixed")
            raise EngineNotReady("the base model is still loading; retry shortly")

    async def resolve(self, model: str, principal: Principal, param: str = "model") -> Target:
        """The exact version `model` names now, if this caller may use it."""
        self._require_ready()
        refs = [checked_ref(part, param) for part in _parts(model, param)]  # a combination: each adapter
        for ref in refs:
            if ref.name != self.base_name() and not principal.may_use(ref.name):
                raise Forbidden(f"key {principal.name!r} may not use {ref.name!r}", param)
        try:
            # off the event loop: the engine's registry reads queue behind a model load's re-hash of its files
            return await asyncio.to_thread(self.engine.resolve, model)
        except AdapterNotFound:
            names = await self.hub.run(_entry_names)
            missing = next((ref for ref in refs if ref.name not in names), None)
            if missing is None:
                # The names exist, one perhaps only since the engine looked (its message would then hint at
                # every tenant's names): a second look can fail only on a version or an alias.
                try:
                    return await asyncio.to_thread(self.engine.resolve, model)
                except AdapterNotFound as again:
                    raise UnknownModel(str(again), param=param) from None
            visible = principal.visible([n for n in names if n != self.base_name()]) + [self.base_name()]
            raise UnknownModel(f"no model named {missing.name!r}", principal.nearest(missing.name, visible),
                               param) from None

    # --- listing ---------------------------------------------------------------------------------
    async def model_cards(self, principal: Principal) -> list[ModelCard]:
        self._require_ready()
        base_ref, max_len, owner = self.engine.base.ref, self.engine.max_model_len, self.settings.owned_by
        cards = await self.hub.run(lambda reg: _cards(reg, base_ref, max_len, owner, self.labels))
        return [c for c in cards if c.kind == "base" or principal.may_use(c.id.partition("@")[0])]

    async def model_card(self, model: str, principal: Principal) -> ModelCard:
        cards = await self.model_cards(principal)
        for card in cards:
            if card.id == model:
                return card
        if "@" in model and not is_composite(model):  # any other version or alias that serves, e.g. the base's
            try:
                root = (await self.resolve(model, principal)).ref
            except (UnknownModel, ApiProblem):
                root = None
            card = next((c for c in cards if c.root == root), None)
            if card is not None:
                return card.model_copy(update={"id": model, "versions": [], "aliases": {}})
        if is_composite(model):  # served as generation serves it: checked and resolved the same way
            target = await self.resolve(model, principal)
            parts = {ref for ref, _ in parse_composite(target.ref)}
            created = max((c.created for c in cards if c.root in parts), default=0)
            return ModelCard(id=model, root=target.ref, parent=self.base_name(), kind="adapter", created=created,
                             owned_by=self.settings.owned_by, max_model_len=self.engine.max_model_len)
        name = model.partition("@")[0]
        if name != self.base_name() and not principal.may_use(name):
            raise Forbidden(f"key {principal.name!r} may not use {name!r}", "model")
        ids = [c.id for c in cards]
        raise UnknownModel(f"no servable model {model!r}", principal.nearest(model, ids))

    async def adapters(self, kind: str | None = None, tier: str | None = None) -> list[AdapterInfo]:
        """Every adapter and full-model version in the registry, with where it is held now."""
        self._require_ready()
        base_ref = self.engine.base.ref
        residency = {r.digest: r for r in self.engine.residency()}
        infos = await self.hub.run(lambda reg: _adapter_infos(reg, base_ref, residency, self.labels))
        return [i for i in infos if (kind is None or i.kind == kind) and (tier is None or i.residency.tier == tier)]

    async def adapter(self, ref: str) -> AdapterInfo:
        """One adapter or full-model version, servable here or not (read from the registry)."""
        self._require_ready()
        checked_ref(ref, "ref")
        try:
            version = await self.hub.run(lambda reg: reg.resolve(ref))
        except NotFoundError as exc:
            raise UnknownModel(str(exc), param="ref") from None  # admins see every name: hints included
        for info in await self.adapters():
            if info.ref == version.ref:
                return info
        raise ApiProblem(f"{version.ref} is a {version.kind}, not an adapter or a full model", "ref")


def _parts(model: str, param: str) -> list[str]:
    """The references ``model`` names: itself, or each adapter of a combination (``"a*0.7+b*0.3"``)."""
    if not isinstance(model, str) or not is_composite(model):
        return [model]
    try:
        return [ref for ref, _ in parse_composite(model)]
    except ValueError as exc:
        raise BadReference(f"{param}: {exc}", param) from None


def checked_ref(text: str, param: str) -> Ref:
    """Parse a reference; a malformed one (bad name, version out of range) is a 400 naming `param`."""
    try:
        return parse_ref(text)
    except InvalidName as exc:
        raise BadReference(f"{param}: {exc}", param) from None


def _entry_names(reg: Registry) -> list[str]:
    return sorted({v.name for v in reg.list()})


def servable(version: Version, base: Version) -> bool:
    if version.kind == "adapter":
        return version.metadata.base_fingerprint == base.metadata.fingerprint
    return version.kind == "model"


class LabelNames:
    """A classifier's label names per version digest: a version's files never change, so each is read once."""

    def __init__(self) -> None:
        self._known: dict[str, list[str] | None] = {}

    def __call__(self, reg: Registry, version: Version) -> list[str] | None:
        if version.digest not in self._known:
            try:
                folder = reg.open(version).path
            except HubError:  # a damaged version is listed without names; serving it reports the damage
                return None
            self._known[version.digest] = classifier_label_names(folder)
        return self._known[version.digest]


def _cards(reg: Registry, base_ref: str, max_len: int, owner: str, labels: LabelNames) -> list[ModelCard]:
    base = reg.resolve(base_ref)
    base_aliases = {a: n for a, n in reg.aliases(base.name).items() if n == base.version}  # the served one's
    cards = [ModelCard(id=base.name, root=base.ref, kind="base", created=_ts(base), owned_by=owner,
                       max_model_len=max_len, versions=[base.version], aliases=base_aliases)]
    by_name: dict[str, list[Version]] = defaultdict(list)
    for version in reg.list():
        if version.kind in SERVED_KINDS and servable(version, base):
            by_name[version.name].append(version)
    for name, versions in sorted(by_name.items()):
        numbered = {v.version: v for v in versions}
        aliases = {a: n for a, n in reg.aliases(name).items() if n in numbered}
        parent = base.name if versions[0].kind == "adapter" else None

        def card(card_id: str, v: Version, **extra) -> ModelCard:
            return ModelCard(id=card_id, root=v.ref, parent=parent, kind=v.kind, created=_ts(v), owned_by=owner,
                             max_model_len=max_len, labels=labels(reg, v), **extra)

        if "latest" in aliases:
            cards.append(card(name, numbered[aliases["latest"]], versions=sorted(numbered), aliases=aliases))
        cards += [card(v.ref, v) for v in versions]
        cards += [card(f"{name}@{a}", numbered[n]) for a, n in aliases.items() if a != "latest"]
    return cards


def _adapter_infos(reg: Registry, base_ref: str, residency: dict[str, AdapterResidency],
                   labels: LabelNames) -> list[AdapterInfo]:
    base = reg.resolve(base_ref)
    infos = []
    pointing: dict[tuple[str, int], list[str]] = defaultdict(list)
    versions = [v for v in reg.list() if v.kind in SERVED_KINDS]
    for name in sorted({v.name for v in versions}):
        for alias, number in reg.aliases(name).items():
            pointing[(name, number)].append(alias)
    for v in versions:
        meta = v.metadata
        infos.append(AdapterInfo(
            ref=v.ref, name=v.name, version=v.version, kind=v.kind, aliases=sorted(pointing[(v.name, v.version)]),
            digest=v.digest, base=meta.base, servable=servable(v, base), rank=meta.rank, alpha=meta.alpha,
            target_modules=list(meta.target_modules), task=meta.task, language=meta.language, labels=labels(reg, v),
            size_bytes=meta.size_bytes, created=_ts(v), residency=residency_view(residency.get(v.digest))))
    return infos


def residency_view(held: AdapterResidency | None) -> Residency:
    if held is None:
        return Residency(tier="disk")
    return Residency(tier=held.tier, pinned=held.manually_pinned, pins=held.pins, device_bytes=held.size_bytes,
                     last_used=held.last_used or None)


def _ts(version: Version) -> int:
    return int(version.created_at.timestamp())

"""Load a YAML policy file and validate it completely, once, into a `Policy`.

Every rule of the format is checked here, so the rest of the proxy can trust the model.
Every class that a field or role names is declared. Every role that an identity rule
or the default role names is defined. No two field paths of a collection overlap.
The first violation raises a PolicyError that names the file, the key path and what is
allowed.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from .access import RESERVED_ROLE_KEYS, AccessParser, BreakGlass, RowRule
from .master_keys import MasterKeysParser
from .model import AuditSettings, CollectionPolicy, MasterKeyConfig, FieldRule, IdentityRule, KeyCacheSettings, Policy, View
from .names import (
    field_path_problem,
    identifier_problem,
    namespace_problem,
    principal_problem,
)
from .shape import ShapeChecker, child_path, item_path, listing, show, suggest, yaml_type
from .yaml_file import read_policy_yaml

TOP_LEVEL_KEYS = (
    "keys", "classes", "views", "collections", "roles", "identity", "default_role", "on_key_error",
    "audit",
)
KEYS_KEYS = ("master_key_file", "master_keys", "master_key", "key_vault", "cache")
DEFAULT_KEY_VAULT = "encryption.__keyVault"
DEFAULT_MASK_KEEP_LAST = 4
ALGORITHMS = ("deterministic", "random")
DEFAULT_ALGORITHM = "random"
VIEW_NAMES = tuple(view.value for view in View)
KEY_ERROR_VIEWS = (View.CIPHERTEXT.value, View.REDACT.value)
DEFAULT_KEY_CACHE = KeyCacheSettings()


def load_policy(path: str | PathLike[str]) -> Policy:
    """Read and validate the policy file at `path`. Raises PolicyError if it is not valid."""
    source = Path(path)
    data = read_policy_yaml(source)
    return parse_policy(data, source)


def parse_policy(data: object, source: Path) -> Policy:
    """Validate the parsed YAML `data` of the policy file `source` and build the Policy.

    `source` names the file in error messages, and a relative master_key_file is
    resolved against its folder. Raises PolicyError at the first rule broken.
    """
    return _PolicyParser(Path(source)).parse(data)


class _PolicyParser(MasterKeysParser, AccessParser):
    """Policy validation with one method per section, each returning that section's model objects."""

    def parse(self, data: object) -> Policy:
        expected = f"a mapping with the keys {listing(TOP_LEVEL_KEYS)}"
        if data is None:
            self.fail(None, f"the policy file is empty; expected {expected}")
        if not isinstance(data, dict):
            self.fail(None, f"expected {expected}, found {yaml_type(data)}")
        top = self.mapping(data, "")
        self.check_keys(top, "", TOP_LEVEL_KEYS, required=("keys", "classes"))

        master_keys, master_key, key_vault = self.parse_keys(top["keys"])
        classes, key_per = self.parse_classes(top["classes"])
        key_cache = self.parse_key_cache(top["keys"].get("cache"), classes)
        on_key_error = self.choice(
            top.get("on_key_error", View.CIPHERTEXT.value), "on_key_error", KEY_ERROR_VIEWS, "view"
        )
        keep_last = self.parse_views(top.get("views"))
        collections = self.parse_collections(top.get("collections"), classes, key_vault)
        self.check_subject_fields(key_per, collections)
        roles, row_rules, break_glass = self.parse_roles(top.get("roles"), classes)
        identity = self.parse_identity(top.get("identity"), roles)
        default_role = self.parse_default_role(top.get("default_role"), roles)
        audit = self.parse_audit(top.get("audit"))
        self.check_audit_collection(audit, key_vault, collections)
        self.check_row_fields(row_rules, collections)

        return Policy(
            source=self.source,
            master_keys=master_keys,
            master_key=master_key,
            key_vault=key_vault,
            classes=classes,
            collections=collections,
            roles=roles,
            identity=identity,
            default_role=default_role,
            mask_keep_last=keep_last,
            key_cache=key_cache,
            on_key_error=View(on_key_error),
            key_per=key_per,
            audit=audit,
            row_rules=row_rules,
            break_glass=break_glass,
        )

    def parse_keys(self, value: object) -> tuple[tuple[MasterKeyConfig, ...], str, str]:
        """Return the master keys, the name of the active one and the key vault namespace."""
        keys = self.mapping(value, "keys")
        self.check_keys(keys, "keys", KEYS_KEYS)
        master_keys, master_key = self.parse_master_keys(keys)

        key_vault = self.string(keys.get("key_vault", DEFAULT_KEY_VAULT), "keys.key_vault")
        problem = namespace_problem(key_vault)
        if problem is not None:
            self.fail("keys.key_vault", problem)
        return master_keys, master_key, key_vault

    def parse_audit(self, value: object) -> AuditSettings:
        """Return where audit records go; an absent section writes none."""
        audit = self.optional_mapping(value, "audit")
        self.check_keys(audit, "audit", ("file", "collection", "on_failure"))

        file = None
        if "file" in audit:
            file = self.resolve(self.string(audit["file"], "audit.file"))
        collection = None
        if "collection" in audit:
            collection = self.string(audit["collection"], "audit.collection")
            problem = namespace_problem(collection)
            if problem is not None:
                self.fail("audit.collection", problem)
        on_failure = self.choice(audit.get("on_failure", "continue"), "audit.on_failure",
                                 ("continue", "reject"), "setting")
        return AuditSettings(file=file, collection=collection, on_failure=on_failure)

    def check_audit_collection(
        self, audit: AuditSettings, key_vault: str, collections: dict[str, CollectionPolicy]
    ) -> None:
        """Keep audit records out of the key vault and out of protected collections."""
        if audit.collection is None:
            return
        if audit.collection == key_vault:
            self.fail("audit.collection", "the key vault (keys.key_vault) cannot hold audit "
                                          "records; name a collection of its own, for example "
                                          "audit.events")
        if audit.collection in collections:
            self.fail("audit.collection", f"{audit.collection} is a protected collection; audit "
                                          "records need a collection of their own")

    def check_row_fields(
        self, row_rules: dict[str, RowRule], collections: dict[str, CollectionPolicy]
    ) -> None:
        """Reject a row rule on a randomly encrypted field, which no filter can compare."""
        for role, rule in row_rules.items():
            fields = ([rule.owner_field] if rule.owner_field is not None
                      else [key for key in rule.filter if not key.startswith("$")])
            for field in fields:
                for namespace, collection in collections.items():
                    protected = collection.rule_for(field)
                    if protected is not None and not protected.deterministic:
                        self.fail(
                            child_path(child_path("roles", role), "rows"),
                            f"{field!r} is encrypted with the random algorithm in {namespace}, "
                            "so no filter can compare it; use an unprotected field or a "
                            "deterministic one")

    def parse_key_cache(self, value: object, classes: tuple[str, ...]) -> KeyCacheSettings:
        """Return the limits of the data key cache, checked against the declared classes."""
        cache = self.optional_mapping(value, "keys.cache")
        self.check_keys(cache, "keys.cache", ("ttl_seconds", "max_keys"))

        ttl = cache.get("ttl_seconds", DEFAULT_KEY_CACHE.ttl_seconds)
        # bool is a subclass of int, but `ttl_seconds: yes` is surely a mistake.
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < float("inf"):
            self.fail("keys.cache.ttl_seconds", f"expected a positive number of seconds, found {show(ttl)}")

        max_keys = cache.get("max_keys", DEFAULT_KEY_CACHE.max_keys)
        # One command can need the key of every class at once, so a smaller cache could
        # evict a key that the same command loaded a moment before, again and again.
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < len(classes):
            self.fail(
                "keys.cache.max_keys",
                f"expected an integer of at least {len(classes)} (the number of classes), "
                f"found {show(max_keys)}",
            )
        return KeyCacheSettings(ttl_seconds=ttl, max_keys=max_keys)

    def parse_classes(self, value: object) -> tuple[tuple[str, ...], dict[str, str]]:
        """Return the class names and, for classes keyed per data subject, the subject field.

        `classes` is a list of names, or a mapping from each name to its options
        (`{key_per: FIELD}` or nothing).
        """
        if isinstance(value, dict):
            return self.parse_class_mapping(self.mapping(value, "classes"))

        items = self.sequence(value, "classes")
        if not items:
            self.fail("classes", "the list is empty; declare at least one data class, for example [identity]")

        classes: list[str] = []
        for index, item in enumerate(items):
            where = item_path("classes", index)
            name = self.class_name(item, where)
            if name in classes:
                self.fail(where, f"the class {name!r} is declared twice")
            classes.append(name)
        return tuple(classes), {}

    def parse_class_mapping(self, entries: dict[str, object]) -> tuple[tuple[str, ...], dict[str, str]]:
        if not entries:
            self.fail("classes", "the mapping is empty; declare at least one data class, for example {identity: {}}")

        key_per: dict[str, str] = {}
        for name, options in entries.items():
            where = child_path("classes", name)
            self.class_name(name, where)
            options = self.optional_mapping(options, where)
            self.check_keys(options, where, ("key_per",))
            if "key_per" in options:
                field_where = child_path(where, "key_per")
                subject_field = self.string(options["key_per"], field_where)
                # _id cannot be protected, which is what field_path_problem rejects it
                # for, but it is the most natural subject: one key per document.
                problem = None if subject_field == "_id" else field_path_problem(subject_field)
                if problem is not None:
                    self.fail(field_where, problem)
                key_per[name] = subject_field
        return tuple(entries), key_per

    def class_name(self, value: object, where: str) -> str:
        name = self.string(value, where)
        problem = identifier_problem(name)
        if problem is not None:
            self.fail(where, problem)
        if name in RESERVED_ROLE_KEYS:
            self.fail(where, f"{name!r} is reserved for role entries; choose another class name")
        if name == "audit":
            # The key vault's "mongoveil:audit" key seals the audit trail.
            self.fail(where, "'audit' is reserved for the audit trail's key; choose another class name")
        return name

    def check_subject_fields(
        self, key_per: dict[str, str], collections: dict[str, CollectionPolicy]
    ) -> None:
        """Reject a subject field that is itself protected.

        The proxy reads the subject from the document in clear to choose the data
        key, so a protected subject field could not name its key.
        """
        for class_name, subject_field in key_per.items():
            for namespace, collection in collections.items():
                rule = collection.rule_for(subject_field) or next(
                    (rule for path, rule in collection.fields.items()
                     if path.startswith(subject_field + ".")),
                    None,
                )
                if rule is not None:
                    self.fail(
                        child_path(child_path("classes", class_name), "key_per"),
                        f"{subject_field!r} is protected in {namespace} (class "
                        f"{rule.class_name!r}); the field that names the data subject must "
                        "stay unprotected",
                    )

    def parse_views(self, value: object) -> int:
        """Return the number of trailing characters the mask view keeps."""
        views = self.optional_mapping(value, "views")
        self.check_keys(views, "views", ("mask",))

        mask = self.optional_mapping(views.get("mask"), "views.mask")
        self.check_keys(mask, "views.mask", ("keep_last",))

        keep_last = mask.get("keep_last", DEFAULT_MASK_KEEP_LAST)
        # bool is a subclass of int, but `keep_last: yes` is surely a mistake.
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            self.fail("views.mask.keep_last", f"expected a non-negative integer, found {show(keep_last)}")
        return keep_last

    def parse_collections(
        self, value: object, classes: tuple[str, ...], key_vault: str
    ) -> dict[str, CollectionPolicy]:
        collections = self.optional_mapping(value, "collections")

        result: dict[str, CollectionPolicy] = {}
        for namespace, entry in collections.items():
            where = child_path("collections", namespace)
            problem = namespace_problem(namespace)
            if problem is not None:
                self.fail(where, problem)
            if namespace == key_vault:
                self.fail(where, "the key vault collection (keys.key_vault) cannot have protected fields")
            result[namespace] = self.parse_collection(namespace, entry, classes)
        return result

    def parse_collection(self, namespace: str, value: object, classes: tuple[str, ...]) -> CollectionPolicy:
        where = child_path("collections", namespace)
        entry = self.mapping(value, where)
        self.check_keys(entry, where, ("fields",), required=("fields",))

        fields_where = child_path(where, "fields")
        fields = self.mapping(entry["fields"], fields_where)
        if not fields:
            self.fail(fields_where, "no fields; list at least one protected field, or remove the collection")

        rules: dict[str, FieldRule] = {}
        for path, rule_value in fields.items():
            rules[path] = self.parse_field(fields_where, path, rule_value, classes)
        self.check_overlaps(fields_where, tuple(rules))
        return CollectionPolicy(namespace=namespace, fields=rules)

    def parse_field(self, fields_where: str, path: str, value: object, classes: tuple[str, ...]) -> FieldRule:
        where = child_path(fields_where, path)
        problem = field_path_problem(path)
        if problem is not None:
            self.fail(where, problem)

        rule = self.mapping(value, where)
        self.check_keys(rule, where, ("class", "algorithm"), required=("class",))
        class_name = self.choice(rule["class"], child_path(where, "class"), classes, "class")
        algorithm = self.choice(
            rule.get("algorithm", DEFAULT_ALGORITHM), child_path(where, "algorithm"), ALGORITHMS, "algorithm"
        )
        return FieldRule(path=path, class_name=class_name, deterministic=algorithm == "deterministic")

    def check_overlaps(self, fields_where: str, paths: tuple[str, ...]) -> None:
        """Raise when a protected path lies inside another, because the outer one is encrypted whole."""
        for inner in paths:
            for outer in paths:
                if inner.startswith(outer + "."):
                    self.fail(
                        child_path(fields_where, inner),
                        f"lies inside the protected field {outer!r}; protect {outer!r} as a whole "
                        "or only the fields inside it, not both",
                    )

    def parse_roles(
        self, value: object, classes: tuple[str, ...]
    ) -> tuple[dict[str, dict[str, View]], dict[str, RowRule], dict[str, BreakGlass]]:
        """Return each role's views, and the row rules and break-glass grants of those that have them."""
        roles = self.optional_mapping(value, "roles")

        result: dict[str, dict[str, View]] = {}
        row_rules: dict[str, RowRule] = {}
        break_glass: dict[str, BreakGlass] = {}
        for role_name, entry in roles.items():
            where = child_path("roles", role_name)
            problem = identifier_problem(role_name)
            if problem is not None:
                self.fail(where, problem)
            entry = dict(self.mapping(entry, where))
            if "rows" in entry:
                row_rules[role_name] = self.parse_rows(entry.pop("rows"), child_path(where, "rows"))
            if "break_glass" in entry:
                break_glass[role_name] = self.parse_break_glass(
                    entry.pop("break_glass"), child_path(where, "break_glass"), classes, VIEW_NAMES)
            result[role_name] = self.parse_role(where, entry, classes)
        return result, row_rules, break_glass

    def parse_role(self, where: str, value: object, classes: tuple[str, ...]) -> dict[str, View]:
        entry = self.mapping(value, where)

        views: dict[str, View] = {}
        for class_name, view_name in entry.items():
            class_where = child_path(where, class_name)
            if class_name not in classes:
                hint = suggest(class_name, classes)
                self.fail(
                    class_where,
                    f"unknown class {class_name!r}; "
                    f"classes declared under 'classes': {listing(classes)}{hint}",
                )
            views[class_name] = View(self.choice(view_name, class_where, VIEW_NAMES, "view"))
        return views

    def parse_identity(self, value: object, roles: dict) -> tuple[IdentityRule, ...]:
        items = [] if value is None else self.sequence(value, "identity")
        return tuple(
            self.parse_identity_rule(item_path("identity", index), item, roles)
            for index, item in enumerate(items)
        )

    def parse_identity_rule(
        self, where: str, value: object, roles: dict[str, dict[str, View]]
    ) -> IdentityRule:
        entry = self.mapping(value, where)
        self.check_keys(entry, where, ("user", "mongodb_role", "roles"), required=("roles",))

        principals = [key for key in ("user", "mongodb_role") if key in entry]
        if not principals:
            self.fail(where, "missing 'user' or 'mongodb_role'; give exactly one, in the form 'name@database'")
        if len(principals) > 1:
            self.fail(
                where,
                "both 'user' and 'mongodb_role' are given; give exactly one, and add a second entry for the other",
            )
        principal_key = principals[0]
        principal = self.string(entry[principal_key], child_path(where, principal_key))
        problem = principal_problem(principal)
        if problem is not None:
            self.fail(child_path(where, principal_key), problem)

        role_names = self.parse_role_list(child_path(where, "roles"), entry["roles"], roles)
        return IdentityRule(
            user=principal if principal_key == "user" else None,
            mongodb_role=principal if principal_key == "mongodb_role" else None,
            roles=role_names,
        )

    def parse_role_list(
        self, where: str, value: object, roles: dict[str, dict[str, View]]
    ) -> tuple[str, ...]:
        items = self.sequence(value, where)
        if not items:
            self.fail(where, "the list is empty; name at least one role defined under 'roles'")
        return tuple(
            self.choice(item, item_path(where, index), roles, "role")
            for index, item in enumerate(items)
        )

    def parse_default_role(self, value: object, roles: dict[str, dict[str, View]]) -> str | None:
        if value is None:
            return None
        return self.choice(value, "default_role", roles, "role")

"""A small evaluator of S3 policies with their conditions, for what moto does not evaluate.

moto 5.2 authorises actions and resources but ignores every Condition, and no offline library we
found evaluates conditions either (parliament lints, it does not decide; aws-iam-tester calls
AWS's simulator online). This covers exactly what the shipped policies use (AWS's documented
semantics, https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_evaluation-logic.html):

- an explicit Deny in the identity policy or the bucket policy wins; otherwise an Allow of the
  identity policy is needed (one account: the bucket policy here only denies);
- Action and Resource match with `*` and `?` wildcards;
- every operator of a Condition block must hold, every key of an operator must hold, any value
  of a key may match; a key absent from the request fails every operator but Null;
- operators: Null ("true": the key is absent), Bool, StringEquals, StringLike.
Anything else raises, so a policy that grows a new operator cannot be judged by a guess.
"""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _condition_holds(condition: Mapping[str, Mapping[str, Any]], context: Mapping[str, str]) -> bool:
    for operator, keys in condition.items():
        for key, wanted in keys.items():
            values = [str(v) for v in _as_list(wanted)]
            present = key in context
            if operator == "Null":
                holds = any((v == "true") != present for v in values)
            elif not present:
                holds = False
            elif operator == "Bool":
                holds = context[key].lower() in [v.lower() for v in values]
            elif operator == "StringEquals":
                holds = context[key] in values
            elif operator == "StringLike":
                holds = any(fnmatchcase(context[key], v) for v in values)
            else:
                raise ValueError(f"condition operator {operator} is not modelled")
            if not holds:
                return False
    return True


def _matches(statement: Mapping[str, Any], action: str, resource: str, context: Mapping[str, str]) -> bool:
    if "NotAction" in statement or "NotResource" in statement:
        raise ValueError("NotAction/NotResource are not modelled")
    return (any(fnmatchcase(action, a) for a in _as_list(statement["Action"]))
            and any(fnmatchcase(resource, r) for r in _as_list(statement["Resource"]))
            and _condition_holds(statement.get("Condition", {}), context))


def allowed(identity: Mapping[str, Any], bucket: Mapping[str, Any] | None, action: str, resource: str,
            context: Mapping[str, str]) -> bool:
    """Whether a request of `action` on `resource` with request `context` is allowed."""
    statements = list(identity["Statement"]) + list(bucket["Statement"] if bucket else [])
    if any(s["Effect"] == "Deny" and _matches(s, action, resource, context) for s in statements):
        return False
    return any(s["Effect"] == "Allow" and _matches(s, action, resource, context) for s in identity["Statement"])

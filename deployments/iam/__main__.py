"""python -m deployments.iam render --role ROLE (--store s3://bucket/prefix | --bucket B [--prefix P])"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from deployments.iam import BUCKET_POLICY, ROLES, parse_store, render_policy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.iam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="print a role's IAM policy (or the bucket policy) for one store")
    render.add_argument("--role", required=True, choices=(*ROLES, BUCKET_POLICY))
    render.add_argument("--store", help="s3://bucket/prefix (instead of --bucket and --prefix)")
    render.add_argument("--bucket", help="bucket name")
    render.add_argument("--prefix", default="", help="the store's prefix inside the bucket ('' for the root)")
    args = parser.parse_args(argv)
    try:
        if args.store:
            if args.bucket:
                raise ValueError("pass --store or --bucket/--prefix, not both")
            bucket, prefix = parse_store(args.store)
        elif args.bucket:
            bucket, prefix = args.bucket, args.prefix
        else:
            raise ValueError("pass --store s3://bucket/prefix or --bucket")
        document = render_policy(args.role, bucket, prefix)
    except ValueError as exc:
        print(f"deployments.iam: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

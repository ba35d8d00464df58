"""Create S3 buckets if they are missing (compose's one-shot `buckets` service; MinIO starts empty).

Usage: python deploy/s3_bucket.py BUCKET [BUCKET ...]
The endpoint is MLFLOW_S3_ENDPOINT_URL (the one the MLflow server writes to); boto3 reads the
credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
"""

import os
import sys

import boto3
from botocore.exceptions import ClientError


def ensure_buckets(names: list[str]) -> None:
    s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
    for name in names:
        try:
            s3.head_bucket(Bucket=name)
            print(f"s3://{name} exists")
        except ClientError:
            s3.create_bucket(Bucket=name)
            print(f"s3://{name} created")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    ensure_buckets(sys.argv[1:])

"""The gke target's restore points in its GCS bucket, beside the terraform state.

``gs://<bucket>/<prefix>/restore-points/<id>/manifest.json`` holds what a weekend
shutdown kept (pool sizes, or PVC -> PV -> disk -> snapshot); ``COMPLETE`` beside it is
written last, once everything it names exists; ``<prefix>/teardown.json`` is the mark of
an interrupted teardown or restore. Written with google-cloud-storage; each object is
written whole (GCS has no partial objects), so a reader sees the old or the new one.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from google.api_core import exceptions as api_exceptions

from core.config import GoogleApis
from core.restore_points import COMPLETE, MANIFEST, RestorePoint, TeardownMark

MARK = "teardown.json"


class RestorePointStoreError(RuntimeError):
    """The bucket could not be read or written; the message is one line with the API's."""


def storage_client(apis: GoogleApis, project: str):
    from google.cloud import storage

    options = {"api_endpoint": apis.storage} if apis.storage else None
    if apis.anonymous:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project, credentials=AnonymousCredentials(), client_options=options)
    return storage.Client(project=project, client_options=options)


class RestorePointStore:
    """One site's restore points and mark under ``prefix`` in ``bucket``."""

    def __init__(self, client, bucket: str, prefix: str):
        self.bucket = client.bucket(bucket)
        self.name = bucket
        self.prefix = prefix.strip("/")

    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    def _call(self, what: str, fn):
        try:
            return fn()
        except api_exceptions.GoogleAPICallError as exc:
            raise RestorePointStoreError(f"gs://{self.name}/{self.prefix}: {what}: {exc.code} {exc.message}") from None

    def check(self) -> None:
        """The bucket answers and this site's prefix can be listed."""
        self._call("list", lambda: list(self.bucket.list_blobs(prefix=self._key(""), max_results=1)))

    def write_manifest(self, point_id: str, manifest: dict) -> None:
        blob = self.bucket.blob(self._key("restore-points", point_id, MANIFEST))
        self._call("write manifest", lambda: blob.upload_from_string(json.dumps(manifest, indent=2, sort_keys=True, default=str), content_type="application/json"))

    def read_manifest(self, point_id: str) -> dict:
        blob = self.bucket.blob(self._key("restore-points", point_id, MANIFEST))
        return json.loads(self._call("read manifest", blob.download_as_text))

    def mark_complete(self, point_id: str) -> None:
        blob = self.bucket.blob(self._key("restore-points", point_id, COMPLETE))
        self._call("mark complete", lambda: blob.upload_from_string("complete\n"))

    def points(self) -> list[RestorePoint]:
        names = [b.name for b in self._call("list restore points", lambda: list(self.bucket.list_blobs(prefix=self._key("restore-points", ""))))]
        found: dict[str, set[str]] = {}
        for name in names:
            rest = name[len(self._key("restore-points", "")) :].split("/")
            if len(rest) == 2 and rest[0].startswith("rp-"):
                found.setdefault(rest[0], set()).add(rest[1])
        return sorted(
            (RestorePoint(id=pid, path=f"gs://{self.name}/{self._key('restore-points', pid)}", complete={COMPLETE, MANIFEST} <= files)
             for pid, files in found.items()),
            key=lambda p: p.id,
        )

    def delete_point(self, point_id: str) -> None:
        for blob in self._call("list", lambda: list(self.bucket.list_blobs(prefix=self._key("restore-points", point_id, "")))):
            self._call("delete", blob.delete)

    def read_mark(self) -> TeardownMark | None:
        blob = self.bucket.blob(self._key(MARK))
        if not self._call("read mark", blob.exists):
            return None
        return TeardownMark.model_validate_json(self._call("read mark", blob.download_as_text))

    def write_mark(self, phase: str, point_id: str) -> None:
        mark = TeardownMark(phase=phase, restore_point=point_id, since=datetime.now(UTC))
        blob = self.bucket.blob(self._key(MARK))
        self._call("write mark", lambda: blob.upload_from_string(mark.model_dump_json(), content_type="application/json"))

    def clear_mark(self) -> None:
        blob = self.bucket.blob(self._key(MARK))
        try:
            blob.delete()
        except api_exceptions.NotFound:
            pass
        except api_exceptions.GoogleAPICallError as exc:
            raise RestorePointStoreError(f"gs://{self.name}/{self.prefix}: clear mark: {exc.code} {exc.message}") from None

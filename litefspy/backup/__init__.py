"""Continuous backups to object storage and point-in-time restore.

layout (object names, restore and compaction plans: pure), target (the
object store behind a backup URL), uploader (the primary's upload, compaction
and retention), runner (starts the uploader while this node is the primary),
restore (restore and `backup list`).
"""

"""A GIN index for full-text search on PostgreSQL (SQLite search falls back to LIKE)."""

from django.db import migrations


def create_index(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(
        "CREATE INDEX IF NOT EXISTS message_body_search_idx "
        "ON messaging_message USING GIN (to_tsvector('english'::regconfig, COALESCE(body, '')))"
    )


def drop_index(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP INDEX IF EXISTS message_body_search_idx")


class Migration(migrations.Migration):
    dependencies = [("messaging", "0001_initial")]
    operations = [migrations.RunPython(create_index, drop_index)]

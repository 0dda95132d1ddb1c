import hashlib

from django.db import migrations

PREFIX = "sha256:"


def digest_stored_tokens(apps, schema_editor):  # type: ignore[no-untyped-def]
    """Refresh tokens stored whole before this release become digests: read from the table, none works."""
    OutstandingToken = apps.get_model("token_blacklist", "OutstandingToken")
    for row in OutstandingToken.objects.exclude(token__startswith=PREFIX).only("pk", "token").iterator():
        OutstandingToken.objects.filter(pk=row.pk).update(token=PREFIX + hashlib.sha256(row.token.encode()).hexdigest())


class Migration(migrations.Migration):
    dependencies = [("accounts", "0004_api_key_scopes"), ("token_blacklist", "0013_alter_blacklistedtoken_options_and_more")]

    operations = [migrations.RunPython(digest_stored_tokens, migrations.RunPython.noop)]

from django.db import migrations, models

import accounts.models


class Migration(migrations.Migration):
    """Keys get scopes; keys made before keep inference only (conversations and management must be granted)."""

    dependencies = [("accounts", "0003_usage")]

    operations = [
        migrations.AddField(
            model_name="apikey",
            name="scopes",
            field=models.JSONField(blank=True, default=accounts.models.default_scopes,
                                   help_text="what the key may do: inference, conversations, management"),
        ),
    ]

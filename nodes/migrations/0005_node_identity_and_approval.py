from django.db import migrations, models


class Migration(migrations.Migration):
    """Nodes prove their identity with a secret of their own and new ones wait for approval.

    Nodes known before this release stay approved; each gets its secret on its next link.
    """

    dependencies = [("nodes", "0004_node_metrics_and_logs")]

    operations = [
        migrations.AddField(model_name="node", name="approved", field=models.BooleanField(default=True)),
        migrations.AddField(model_name="node", name="identity_secret_encrypted",
                            field=models.TextField(blank=True, editable=False)),
    ]

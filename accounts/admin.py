from django.contrib import admin, messages

from .models import ApiKey


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix", "owner", "created_at", "last_used_at")
    search_fields = ("name", "prefix", "owner__username")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    fields = ("name", "owner", "prefix", "created_at", "last_used_at")

    def save_model(self, request, obj, form, change):  # type: ignore[no-untyped-def]
        if change:
            super().save_model(request, obj, form, change)
            return
        key, raw = ApiKey.create_with_raw_key(name=obj.name, owner=obj.owner)
        obj.pk, obj.prefix, obj.digest, obj.created_at = key.pk, key.prefix, key.digest, key.created_at
        obj._state.adding = False
        messages.warning(request, f"API key created. Copy it now, it will not be shown again: {raw}")

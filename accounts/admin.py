from typing import Any

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest

from .models import ApiKey, Usage, User
from .users import UserRuleBroken, ensure_another_admin, signed_in, user_delete


class ProductPermissionAdmin(admin.ModelAdmin):
    """Every action on these pages needs one product permission, not Django's per-model ones."""

    permission = ""

    def _allowed(self, request: HttpRequest) -> bool:
        return bool(request.user.is_active and request.user.has_perm(self.permission))

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self._allowed(request)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self._allowed(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return self._allowed(request)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self._allowed(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self._allowed(request)


@admin.register(User)
class UserAdmin(ProductPermissionAdmin, DjangoUserAdmin):
    permission = "accounts.manage_users"
    list_display = ("username", "first_name", "last_name", "user_type", "is_active", "last_login")
    list_filter = ("user_type", "is_active")
    fieldsets = (
        *(DjangoUserAdmin.fieldsets or ()),
        ("OptimaGPT", {"fields": ("user_type",)}),
    )

    def save_model(self, request: HttpRequest, obj: User, form: Any, change: bool) -> None:
        if change and ("user_type" in form.changed_data or "is_active" in form.changed_data):
            stored = User.objects.get(pk=obj.pk)
            if stored.user_type == User.Type.ADMIN and stored.is_active and (
                    obj.user_type != User.Type.ADMIN or not obj.is_active):
                try:
                    ensure_another_admin(stored)
                except UserRuleBroken as exc:
                    raise PermissionDenied(str(exc)) from None
        super().save_model(request, obj, form, change)

    def delete_model(self, request: HttpRequest, obj: User) -> None:
        try:
            user_delete(actor=signed_in(request), user=obj)
        except UserRuleBroken as exc:
            raise PermissionDenied(str(exc)) from None

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        for user in queryset:
            self.delete_model(request, user)


@admin.register(ApiKey)
class ApiKeyAdmin(ProductPermissionAdmin):
    permission = "accounts.manage_api_keys"
    list_display = ("name", "prefix", "owner", "created_at", "last_used_at", "expires_at")
    search_fields = ("name", "prefix", "owner__username")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    fields = ("name", "owner", "prefix", "created_at", "last_used_at", "expires_at", "allowed_models",
              "allowed_mcp_servers", "default_mcp_servers", "requests_per_minute", "tokens_per_minute",
              "token_budget", "budget_period")

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        key, raw = ApiKey.create_with_raw_key(name=obj.name, owner=obj.owner)
        obj.pk, obj.prefix, obj.digest, obj.created_at = key.pk, key.prefix, key.digest, key.created_at
        obj._state.adding = False
        messages.warning(request, f"API key created. Copy it now, it will not be shown again: {raw}")


@admin.register(Usage)
class UsageAdmin(ProductPermissionAdmin):
    """Read-only: rows are written by the gateway's usage accounting."""

    permission = "accounts.manage_api_keys"
    list_display = ("day", "api_key", "user", "requests", "prompt_tokens", "completion_tokens")
    list_filter = ("day",)
    search_fields = ("api_key__name", "user__username")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

"""Pages: log in and out, users, API keys. Every view checks its permission; hiding a button is not a check."""

from __future__ import annotations

from datetime import UTC, datetime

from asgiref.sync import async_to_sync
from django.contrib import messages
from django.contrib.auth import authenticate, login, logout
from django.contrib.auth.decorators import login_required, permission_required
from django.db.models import F, Q, Sum
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from optimagpt.addresses import client_address

from .forms import ApiKeyCreateForm, UserCreateForm
from .models import ApiKey, User
from .ratelimit import login_retry_after
from .users import UserRuleBroken, signed_in, user_create, user_delete, user_set_type


def login_view(request: HttpRequest) -> HttpResponse:
    next_url = request.POST.get("next") or request.GET.get("next") or "/"
    if not url_has_allowed_host_and_scheme(next_url, allowed_hosts={request.get_host()},
                                           require_https=request.is_secure()):
        next_url = "/"
    context = {"next": next_url, "username": "", "error": ""}
    if request.method != "POST":
        return render(request, "accounts/login.html", context)
    username = request.POST.get("username", "")[:150]
    address = client_address(request)
    context["username"] = username
    retry_after = async_to_sync(login_retry_after)(address=address, username=username)
    if retry_after:
        context["error"] = f"Too many failed logins. Try again in {retry_after} seconds."
        response = render(request, "accounts/login.html", context, status=429)
        response["Retry-After"] = str(retry_after)
        return response
    user = authenticate(request, username=username, password=request.POST.get("password", ""))
    if user is None:  # counted by accounts.backends
        context["error"] = "Incorrect username or password."
        return render(request, "accounts/login.html", context, status=401)
    login(request, user)
    return redirect(next_url)


@require_POST
def logout_view(request: HttpRequest) -> HttpResponse:
    logout(request)
    return redirect("login")


@login_required
@permission_required("accounts.manage_users", raise_exception=True)
def users_view(request: HttpRequest) -> HttpResponse:
    form = UserCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        user_create(username=data["username"], password=data["password"], user_type=data["user_type"],
                    first_name=data["first_name"], last_name=data["last_name"])
        messages.success(request, f"User {data['username']} created.")
        return redirect("users")
    return render(request, "accounts/users.html", {
        "section": "users", "form": form, "types": User.Type.choices,
        "people": User.objects.order_by("username"),
    }, status=400 if form.errors else 200)


@require_POST
@login_required
@permission_required("accounts.manage_users", raise_exception=True)
def user_delete_view(request: HttpRequest, pk: int) -> HttpResponse:
    person = get_object_or_404(User, pk=pk)
    try:
        user_delete(actor=signed_in(request), user=person)
        messages.success(request, f"User {person.username} deleted.")
    except UserRuleBroken as exc:
        messages.error(request, str(exc))
    return redirect("users")


@require_POST
@login_required
@permission_required("accounts.manage_users", raise_exception=True)
def user_type_view(request: HttpRequest, pk: int) -> HttpResponse:
    person = get_object_or_404(User, pk=pk)
    user_type = request.POST.get("user_type", "")
    if user_type not in User.Type.values:
        messages.error(request, "Unknown user type.")
    else:
        try:
            user_set_type(user=person, user_type=user_type)
            messages.success(request, f"{person.username} is now {User.Type(user_type).label}.")
        except UserRuleBroken as exc:
            messages.error(request, str(exc))
    return redirect("users")


def _keys_with_usage() -> list[ApiKey]:
    today = datetime.now(UTC).date()
    tokens = F("usage__prompt_tokens") + F("usage__completion_tokens")
    return list(ApiKey.objects.select_related("owner").annotate(
        tokens_today=Sum(tokens, filter=Q(usage__day=today)),
        tokens_month=Sum(tokens, filter=Q(usage__day__gte=today.replace(day=1))),
    ).order_by("-created_at"))


@login_required
@permission_required("accounts.manage_api_keys", raise_exception=True)
def api_keys_view(request: HttpRequest) -> HttpResponse:
    form = ApiKeyCreateForm(request.POST or None)
    new_key = ""
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        key, new_key = ApiKey.create_with_raw_key(name=data["name"], owner=data["owner"], scopes=data["scopes"])
        for field in ("expires_at", "allowed_models", "allowed_mcp_servers", "default_mcp_servers",
                      "requests_per_minute", "tokens_per_minute", "token_budget", "budget_period"):
            setattr(key, field, data[field])
        key.save()
        form = ApiKeyCreateForm()
    # The new key is shown in this response only: no redirect, nothing kept in the session.
    response = render(request, "accounts/api_keys.html", {
        "section": "api-keys", "form": form, "new_key": new_key, "keys": _keys_with_usage(),
    }, status=400 if form.errors else 200)
    response["Cache-Control"] = "no-store"
    return response


@require_POST
@login_required
@permission_required("accounts.manage_api_keys", raise_exception=True)
def api_key_revoke_view(request: HttpRequest, pk: int) -> HttpResponse:
    key = get_object_or_404(ApiKey, pk=pk)
    key.delete()
    messages.success(request, f"API key {key.name} revoked.")
    return redirect("api-keys")

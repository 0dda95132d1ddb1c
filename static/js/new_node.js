// The refresh control beside the New Node name: asks the gateway for another suggestion.
(function () {
  "use strict";
  const button = document.getElementById("new-name");
  const field = document.getElementById("id_name");
  if (!button || !field) return;
  button.addEventListener("click", async function () {
    const response = await fetch(button.dataset.url, {credentials: "same-origin"});
    if (response.ok) field.value = (await response.json()).name;
  });
})();

// Tessera UI: the one bit of behaviour htmx does not cover — a full-size image viewer.
// Without JavaScript, thumbnails are plain links to the full image.
(function () {
  "use strict";
  function open(link) {
    var dialog = document.getElementById("lightbox");
    if (!dialog || typeof dialog.showModal !== "function") return false;
    var img = document.getElementById("lightbox-img");
    img.src = link.getAttribute("data-full");
    img.alt = link.getAttribute("data-caption") || "";
    document.getElementById("lightbox-caption").textContent = link.getAttribute("data-caption") || "";
    dialog.showModal();
    return true;
  }
  document.addEventListener("click", function (event) {
    var link = event.target.closest && event.target.closest("a.thumb[data-full]");
    if (!link || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) return;
    if (open(link)) event.preventDefault();
  });
  document.addEventListener("click", function (event) {
    var dialog = document.getElementById("lightbox");
    if (dialog && event.target === dialog) dialog.close(); // a click on the backdrop
  });
})();
